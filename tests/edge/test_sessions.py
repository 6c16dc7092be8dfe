import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import sessions
from edge.aggregator import Aggregator, EdgeConfig
from pipeline.transport.mqtt_client import parse_mqtt_url
from pipeline.wire import names
from tests.edge.test_aggregator import observations
from tests.helpers import poll, wait_results


def _session(url: str, client_id: str, expiry_s: int) -> tuple[mqtt.Client, bool]:
    """A paho client connected under `client_id` with a persistent session; (client, session present)."""
    u = parse_mqtt_url(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if u.username:
        c.username_pw_set(u.username, u.password)
    done, present = threading.Event(), []
    c.on_connect = lambda cl, ud, flags, rc, props: (present.append(flags.session_present), done.set())
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    c.connect(u.host, u.port, clean_start=False, properties=props)
    c.loop_start()
    assert done.wait(5)
    return c, present[0]


@pytest.mark.services
def test_a_dead_aggregators_session_is_taken_over_and_what_it_queued_is_decided(stream_setup, brokers, site,
                                                                                redis_conn):
    """An aggregator with a persistent session dies (no DISCONNECT) and never comes back. The
    broker keeps its session, subscribed to the site's share, for --session-expiry-s: without a
    take-over, what was queued there, and its share of what comes next, would wait for minutes
    and be dropped at the expiry with nobody to name it."""
    path, model, data, t1, _ = stream_setup
    n = 12
    dead = f"dead-{site}"[:100]
    ghost, _ = _session(brokers[0], sessions.client_ids(site, dead)[0], 300)
    subscribed = threading.Event()
    ghost.on_subscribe = lambda *a: subscribed.set()
    ghost.subscribe([(names.shared_obs_filter(site, names.SHARE_GROUP), 1),
                     (names.shared_shed_filter(site, names.SHARE_GROUP), 1)])
    assert subscribed.wait(5)
    ghost.loop_stop()
    ghost.socket().close()  # the process died: the broker keeps the session and goes on queueing for it
    sessions.register(redis_conn, site, dead, 300)

    obs = observations(model, data, list(range(n)))
    u = parse_mqtt_url(brokers[0])
    cams = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cams-{site}"[:100], protocol=mqtt.MQTTv5)
    if u.username:
        cams.username_pw_set(u.username, u.password)
    cams.connect(u.host, u.port)
    cams.loop_start()
    try:
        for f in range(n):  # no live aggregator yet: every observation is queued in the dead session
            for o in obs[f]:
                o = type(o)(site, o.frame_id, o.camera, o.captured_at, o.prediction, o.entropy, o.features, o.label)
                cams.publish(names.obs_topic(site, o.camera), o.encode(), qos=1).wait_for_publish(5)
        cfg = EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, deadline_ms=200,
                         service_id=f"live-{site}"[:100])
        live = Aggregator(cfg, model.edge, t1, 1.0).start()  # T2 = 1: every frame ends at the edge
        try:
            assert poll(lambda: redis_conn.xlen(names.results_stream(site)) >= n, 30)
            got = wait_results(redis_conn, site, n, timeout_s=1)
            assert sorted(d.frame_id for d in got) == list(range(n))
            assert all(d.present == (0, 1, 2, 3, 4, 5) for d in got)  # all six from the dead session
            assert poll(lambda: live.reaper.taken == 1, 10) and live.reaper.messages == 6 * n
        finally:
            live.stop()
    finally:
        cams.loop_stop()
        cams.disconnect()
    assert not redis_conn.hexists(names.edge_sessions_key(site), dead)
    assert not redis_conn.exists(names.edge_reap_lock_key(site, dead))
    again, present = _session(brokers[0], sessions.client_ids(site, dead)[0], 0)  # the broker ended the dead session
    again.loop_stop()
    again.disconnect()
    assert present is False


def _edge(stream_setup, brokers, site: str, sid: str) -> Aggregator:
    """A connected aggregator of `site` with a persistent session under service id `sid`."""
    path, model, _, t1, t2 = stream_setup
    cfg = EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, service_id=sid)
    agg = Aggregator(cfg, model.edge, t1, t2)
    agg.connect()
    return agg


def _end_kept_sessions(url: str, site: str, sid: str) -> None:
    """End the MQTT sessions aggregator `sid` kept at the broker (they must be there)."""
    for cid in sessions.client_ids(site, sid):
        c, present = _session(url, cid, 0)
        c.loop_stop()
        c.disconnect()
        assert present


@pytest.mark.services
def test_an_aggregator_with_a_persistent_session_registers_it_and_unregisters_when_others_take_its_share(
        stream_setup, brokers, site, redis_conn):
    a, b = (_edge(stream_setup, brokers, site, f"{x}-{site}"[:100]) for x in "ab")
    try:
        assert redis_conn.hgetall(names.edge_sessions_key(site)) == {a.sid.encode(): b"300", b.sid.encode(): b"300"}
        a.close()  # b is alive: a unsubscribes, nothing of it to take over
        assert redis_conn.hkeys(names.edge_sessions_key(site)) == [b.sid.encode()]
    finally:
        b.close()  # the last one keeps its session (and its entry) for whoever comes next
    assert redis_conn.hkeys(names.edge_sessions_key(site)) == [b.sid.encode()]
    _end_kept_sessions(brokers[0], site, b.sid)


@pytest.mark.services
def test_aggregators_stopped_together_leave_at_least_one_session_subscribed(stream_setup, brokers, site, redis_conn):
    """A compose restart stops every aggregator of a site at once. Each saw the others' heartbeats
    and unsubscribed, so nothing queued for the site while they were down: every frame sent then
    was named 'never received'. Now each removes its own heartbeat before it looks, so the last to
    look keeps its subscriptions (and its session entry, for whoever comes next)."""
    aggs = [_edge(stream_setup, brokers, site, f"{x}-{site}"[:100]) for x in "abc"]
    go = threading.Barrier(len(aggs))
    stoppers = [threading.Thread(target=lambda agg=agg: (go.wait(), agg.close())) for agg in aggs]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30)
    kept = sorted(k.decode() for k in redis_conn.hkeys(names.edge_sessions_key(site)))
    assert kept and set(kept) <= {agg.sid for agg in aggs}
    for sid in kept:
        _end_kept_sessions(brokers[0], site, sid)


@pytest.mark.services
def test_an_aggregator_whose_session_was_taken_over_registers_its_new_one(stream_setup, brokers, site, redis_conn):
    """Stalled long enough to be judged dead, an aggregator has its session taken over, ended and
    unregistered by another; going on, it reconnects to a new session, which it registers at once,
    so that a take-over still comes if it dies later."""
    path, model, _, t1, t2 = stream_setup
    sid = f"s-{site}"[:100]
    cfg = EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, service_id=sid)
    agg = Aggregator(cfg, model.edge, t1, t2).start()
    try:
        assert redis_conn.hexists(names.edge_sessions_key(site), sid)
        gen = agg.mqtt.generation
        # the reaper of another aggregator: it resumes the session (the broker drops this one's
        # connection), ends it and removes the entry
        reaper, present = _session(brokers[0], sessions.client_ids(site, sid)[0], 0)
        assert present
        sessions.unregister(redis_conn, site, sid)
        reaper.loop_stop()
        reaper.disconnect()
        assert poll(lambda: agg.mqtt.generation > gen and redis_conn.hexists(names.edge_sessions_key(site), sid),
                    timeout_s=8)  # well before the next announcement (ANNOUNCE_S, 10 s)
    finally:
        agg.stop()


@pytest.mark.services
def test_a_session_entry_with_no_number_is_taken_over_not_fatal(brokers, site, redis_conn):
    # `ada:{site}:edge_sessions` maps a service id to its session expiry; a value no aggregator
    # wrote ('abc') once raised ValueError in the take-over, and every aggregator of the site exited.
    got = []
    reaper = sessions.SessionReaper(redis_conn, brokers[0], site, f"live-{site}"[:100], "edge",
                                    lambda msg, reaped: got.append(msg), receive_maximum=10, heartbeat_s=0.01)
    redis_conn.hset(names.edge_sessions_key(site), "ghost", "abc")
    try:
        reaper._next = 0
        reaper.tick()  # ghost seen without a heartbeat
        time.sleep(reaper.grace_s)
        reaper._next = 0
        reaper.tick()  # dead past the grace: taken over (for 1 s)
        assert reaper._owner == "ghost"
    finally:
        reaper.close()
