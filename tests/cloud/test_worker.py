import threading

import pytest
import torch

from cloud.worker import CloudConfig, Worker
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.transport.redis_client import alive
from pipeline.wire import names
from pipeline.wire.messages import Decision, Escalation, FeatureTensor
from tests.helpers import beat, poll, wait_results


def escalations(model, site, n, dtype="int8"):
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(n, model.cfg.fused_channels, *model.cfg.wire_shape[1:], generator=g)
    return [Escalation(site, 100 + i, (0, 1, 2, 3, 4, 5), 1.0, FeatureTensor.quantize(fused[i], dtype), 0.9, 1, i % 10)
            for i in range(n)]


def xadd(r, escs):
    for e in escs:
        r.xadd(names.escalations_stream(e.site), {"frame": e.frame_id, "msg": e.encode()})


def results(r, site):
    return [Decision.decode(f[b"msg"]) for _, f in r.xrange(names.results_stream(site))]


def worker(stream_setup, brokers, site, **kw):
    path, model, _, _, _ = stream_setup
    return Worker(CloudConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, device="cpu",
                              **kw), model.cloud)


def test_the_cloud_block_runs_once_before_any_traffic(stream_setup):
    """Its first call is slow (kernel set-up): made at start, not on the first escalations."""
    path, model, _, _, _ = stream_setup
    calls = []
    hook = model.cloud.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        Worker(CloudConfig(site="s", checkpoint=path, device="cpu"), model.cloud)
    finally:
        hook.remove()
    assert calls == [(2, model.cfg.fused_channels, *model.cfg.wire_shape[1:])]


@pytest.mark.services
def test_worker_answers_publishes_then_acks(stream_setup, brokers, site, redis_conn):
    _, model, _, _, _ = stream_setup
    escs = escalations(model, site, 9)
    on_mqtt: list[Decision] = []
    nine = threading.Event()

    def on_message(msg):
        on_mqtt.append(Decision.decode(msg.payload))
        if len(on_mqtt) == 9:
            nine.set()

    sub = mqtt_client(brokers[0], f"{site}-sub", on_connect=lambda c: c.subscribe(names.results_topic(site), qos=1),
                      on_message=on_message)
    w = worker(stream_setup, brokers, site, batch=4, wait_ms=5).start()
    try:
        assert alive(redis_conn, site, "cloud") == [w.sid]
        xadd(redis_conn, escs)
        got = wait_results(redis_conn, site, 9)
        assert nine.wait(10)
    finally:
        w.stop()
        close_mqtt(sub)
    with torch.no_grad():
        fused = torch.stack([e.features.to_tensor() for e in escs])
        expect = model.cloud(fused).argmax(-1)
    assert sorted(d.frame_id for d in got) == [e.frame_id for e in escs]
    for d in got:
        assert d.exit == "cloud" and d.prediction == int(expect[d.frame_id - 100]) and d.label == (d.frame_id - 100) % 10
    assert sorted(d.frame_id for d in on_mqtt) == sorted(d.frame_id for d in got)
    assert redis_conn.xlen(names.escalations_stream(site)) == 0  # acked and deleted
    assert redis_conn.xpending(names.escalations_stream(site), "cloud")["pending"] == 0
    assert alive(redis_conn, site, "cloud") == []


@pytest.mark.services
def test_entries_of_a_dead_worker_are_reclaimed_once(stream_setup, brokers, site, redis_conn):
    _, model, _, _, _ = stream_setup
    stream = names.escalations_stream(site)
    redis_conn.xgroup_create(stream, "cloud", id="0", mkstream=True)
    xadd(redis_conn, escalations(model, site, 5))
    taken = redis_conn.xreadgroup("cloud", "dead-worker", {stream: ">"}, count=5)  # read, never acked
    assert len(taken[0][1]) == 5
    w = worker(stream_setup, brokers, site, claim_idle_ms=1).start()
    try:
        got = wait_results(redis_conn, site, 5)
    finally:
        w.stop()
    assert sorted(d.frame_id for d in got) == list(range(100, 105))
    assert w.stats.reclaimed == 5
    assert redis_conn.xpending(stream, "cloud")["pending"] == 0


@pytest.mark.services
def test_a_worker_restarted_under_its_id_answers_what_its_last_run_held_at_once(stream_setup, brokers, site,
                                                                                redis_conn, caplog):
    """Its previous run (same --service-id: the same consumer) died holding entries: they are
    answered at start, not after claim_idle_ms (30 s by default, kept here), and logged once, as
    its own (not also as reclaimed from dead workers)."""
    _, model, _, _, _ = stream_setup
    stream, sid = names.escalations_stream(site), f"w-{site}"[:100]
    redis_conn.xgroup_create(stream, "cloud", id="0", mkstream=True)
    xadd(redis_conn, escalations(model, site, 4))
    assert len(redis_conn.xreadgroup("cloud", sid, {stream: ">"}, count=4)[0][1]) == 4  # read, never acked
    w = worker(stream_setup, brokers, site, service_id=sid).start()
    try:
        got = wait_results(redis_conn, site, 4, timeout_s=10)
    finally:
        w.stop()
    assert sorted(d.frame_id for d in got) == list(range(100, 104)) and w.stats.reclaimed == 4
    assert redis_conn.xpending(stream, "cloud")["pending"] == 0
    assert "4 escalations this worker's previous run left pending" in caplog.text
    assert "left pending by dead workers" not in caplog.text


@pytest.mark.services
def test_a_stream_deleted_under_the_workers_read_is_made_again(stream_setup, brokers, site, redis_conn):
    # Deleting the escalation stream while the idle worker blocks on it answers the read with
    # UNBLOCKED (NOGROUP at the next one): the group is made again and the worker goes on.
    _, model, _, _, _ = stream_setup
    stream = names.escalations_stream(site)
    w = worker(stream_setup, brokers, site).start()
    try:
        assert poll(lambda: redis_conn.exists(stream))
        redis_conn.delete(stream)
        assert poll(lambda: w.stats.groups_recreated >= 1)
        xadd(redis_conn, escalations(model, site, 3))
        got = wait_results(redis_conn, site, 3)
        assert w._thread.is_alive()
    finally:
        w.stop()
    assert sorted(d.frame_id for d in got) == [100, 101, 102]


@pytest.mark.services
def test_a_reclaimed_entry_republishes_only_a_result_the_cloud_recorded(stream_setup, brokers, site, redis_conn):
    # A dead worker left two entries: frame 101's result was recorded by the cloud (the edge
    # escalated it: its marker is there) and maybe never published, so it is published again;
    # frame 100 has a result from elsewhere (no escalation marker): the cloud's must not go out
    # (it would have been published before 101's, on the same connection and topic).
    _, model, _, _, _ = stream_setup
    stream = names.escalations_stream(site)
    redis_conn.xgroup_create(stream, "cloud", id="0", mkstream=True)
    escs = escalations(model, site, 2)
    xadd(redis_conn, escs)
    redis_conn.xreadgroup("cloud", "dead-worker", {stream: ">"}, count=2)
    redis_conn.set(names.escalated_key(site, 101), "edge-x")
    for e in escs:
        redis_conn.set(names.result_key(site, e.frame_id), "someone")
    seen: list[int] = []
    got = threading.Event()

    def on_message(msg):
        seen.append(Decision.decode(msg.payload).frame_id)
        got.set()

    sub = mqtt_client(brokers[0], f"{site}-sub", on_connect=lambda c: c.subscribe(names.results_topic(site), qos=1),
                      on_message=on_message)
    w = worker(stream_setup, brokers, site, claim_idle_ms=1).start()
    try:
        assert poll(lambda: redis_conn.xpending(stream, "cloud")["pending"] == 0)
        assert got.wait(10)
    finally:
        w.stop()
        close_mqtt(sub)
    assert seen == [101] and redis_conn.xlen(names.results_stream(site)) == 0


@pytest.mark.services
def test_two_workers_and_bad_entries(stream_setup, brokers, site, redis_conn):
    _, model, _, _, _ = stream_setup
    escs = escalations(model, site, 30, dtype="float16")
    ws = [worker(stream_setup, brokers, site, batch=3, wait_ms=2).start() for _ in range(2)]
    try:
        redis_conn.xadd(names.escalations_stream(site), {"frame": 1, "msg": b"not msgpack"})
        # Valid on the wire, not for this network: a seventh camera, an eleventh class.
        f = escs[0].features
        xadd(redis_conn, [Escalation(site, 1, (0, 6), 1.0, f, 0.9, 1, 2), Escalation(site, 2, (0,), 1.0, f, 0.9, 10, 2),
                          Escalation(site, 3, (0,), 1.0, f, 0.9, 1, 10)])
        xadd(redis_conn, escs)
        got = wait_results(redis_conn, site, 30)
    finally:
        for w in ws:
            w.stop()
    assert sorted(d.frame_id for d in got) == [e.frame_id for e in escs]
    assert len(results(redis_conn, site)) == 30
    letters = redis_conn.xrange(names.deadletter_stream(site))
    assert len(letters) == 4
    reasons = sorted(fields[b"reason"].decode() for _, fields in letters)
    assert any("naming cameras [6], this network has 6" in r for r in reasons), reasons
    assert any("edge_prediction 10" in r for r in reasons) and any("label 10" in r for r in reasons), reasons
    assert redis_conn.xlen(names.escalations_stream(site)) == 0


@pytest.fixture
def three_sites(site, redis_conn):
    """Three site ids (the test's own and two more); every key of the two extra ones removed after."""
    sites = [site, f"{site[:50]}-b", f"{site[:50]}-c"]
    yield sites
    for extra in sites[1:]:
        keys = list(redis_conn.scan_iter(match=names.site_pattern(extra), count=1000))
        if keys:
            redis_conn.delete(*keys)
    redis_conn.srem(names.sites_key(), *sites)


@pytest.mark.services
def test_one_worker_serves_many_sites_fairly(stream_setup, brokers, three_sites, redis_conn):
    """A site with a long backlog takes no more than its share of a batch: the other sites'
    entries go in the first batch; each site's results, dead letters and acknowledgements stay its own."""
    _, model, _, _, _ = stream_setup
    a, b, c = three_sites
    w = worker(stream_setup, brokers, a, sites=",".join(three_sites), batch=9, wait_ms=5)
    w.connect()
    try:
        assert w.sites == three_sites
        assert [alive(redis_conn, s, "cloud") for s in three_sites] == [[w.sid]] * 3
        xadd(redis_conn, escalations(model, b, 60))  # b's backlog
        xadd(redis_conn, escalations(model, a, 3) + escalations(model, c, 3))
        redis_conn.xadd(names.escalations_stream(c), {"frame": 1, "msg": b"not msgpack"})
        reads = []
        xreadgroup = w.redis.xreadgroup
        w.redis.xreadgroup = lambda *args, **kw: reads.append(args[2]) or xreadgroup(*args, **kw)
        first = w.read_batch()
        assert len(reads) == 1 and len(reads[0]) == 3  # one read for the three sites, not a round trip each
        del w.redis.xreadgroup
        assert {s for s, _, _ in first} == {a, b, c} and len(first) == 9
        assert sum(s == b for s, _, _ in first) <= 3
        w.process(first)
        while batch := w.read_batch():
            w.process(batch)
    finally:
        w.stop()
    assert [len(results(redis_conn, s)) for s in three_sites] == [3, 60, 3]
    assert all(d.site == s for s in three_sites for d in results(redis_conn, s))
    assert [redis_conn.xlen(names.deadletter_stream(s)) for s in three_sites] == [0, 0, 1]
    assert [redis_conn.xlen(names.escalations_stream(s)) for s in three_sites] == [0, 0, 0]
    assert [alive(redis_conn, s, "cloud") for s in three_sites] == [[], [], []]


@pytest.mark.services
def test_a_site_whose_keys_redis_refuses_stops_only_that_site(stream_setup, brokers, three_sites, redis_conn):
    """One site's stream overwritten by a string (WRONGTYPE), another's results key: once every
    read and every record of every site failed, each turn, until the keys were mended. Now those
    two sites wait (nothing of theirs lost: entries stay in the stream) and the third is served."""
    _, model, _, _, _ = stream_setup
    a, b, c = three_sites
    redis_conn.set(names.escalations_stream(b), "not a stream")  # before the start: the group cannot be made
    w = worker(stream_setup, brokers, a, sites=",".join(three_sites), batch=8, wait_ms=5, claim_interval_s=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    w.connect()
    try:
        assert w.sites == three_sites and w.stats.redis_errors == 1
        redis_conn.set(names.results_stream(c), "not a stream")
        xadd(redis_conn, escalations(model, a, 5) + escalations(model, c, 4))
        thread.start()
        assert len(wait_results(redis_conn, a, 5, timeout_s=10)) == 5
        assert poll(lambda: w.stats.redis_errors >= 2)
        assert redis_conn.xlen(names.escalations_stream(c)) == 4 and not redis_conn.exists(names.result_key(c, 100))
        redis_conn.delete(names.escalations_stream(b), names.results_stream(c))  # the operator mends both keys
        xadd(redis_conn, escalations(model, b, 3))
        # Each waits out its SITE_RETRY_S (5 s) first.
        assert poll(lambda: len(results(redis_conn, b)) == 3, 20)  # the group made again
        # its entries, pending at this worker, read again at once (not after claim_idle_ms, 30 s here)
        assert poll(lambda: len(results(redis_conn, c)) == 4, 20)
    finally:
        stop.set()
        thread.join(10)
        w.stop()
    assert [len(results(redis_conn, s)) for s in three_sites] == [5, 3, 4]
    assert [redis_conn.xlen(names.deadletter_stream(s)) for s in three_sites] == [0, 0, 0]


@pytest.mark.services
def test_every_announced_site_is_served(stream_setup, brokers, three_sites, redis_conn):
    a, b, c = three_sites
    redis_conn.sadd(names.sites_key(), a, b)
    w = worker(stream_setup, brokers, a, sites="*", group=f"g-{a[-8:]}")  # a group of its own: other sites untouched
    w.connect()
    try:
        assert {a, b} <= set(w.sites) and c not in w.sites
        redis_conn.sadd(names.sites_key(), c)
        w.update_sites()
        assert {a, b, c} <= set(w.sites)
        assert alive(redis_conn, c, "cloud") == [w.sid]
    finally:
        w.stop()


@pytest.mark.services
def test_a_site_that_left_the_registry_is_retired_once_drained(stream_setup, brokers, three_sites, redis_conn):
    # A finished replay removes its site's keys and its registry entry; a site removed by hand may
    # still have escalations waiting. Neither is brought back (stream, group, heartbeat), and what
    # waits is answered first.
    _, model, _, _, _ = stream_setup
    a, b, c = three_sites
    redis_conn.sadd(names.sites_key(), a, b, c)
    w = worker(stream_setup, brokers, a, sites="*", group=f"g-{a[-8:]}")
    w.connect()
    try:
        assert {a, b, c} <= set(w.sites)
        redis_conn.delete(names.escalations_stream(b))  # b: removed as a replay removes its site
        redis_conn.srem(names.sites_key(), b)
        xadd(redis_conn, escalations(model, c, 2))  # c: removed by hand, two escalations waiting
        redis_conn.srem(names.sites_key(), c)
        assert w._read(b, 10, None) == []  # its group is gone with its stream: retired, not made again
        assert b not in w.sites and not redis_conn.exists(names.escalations_stream(b))
        assert alive(redis_conn, b, "cloud") == []
        w.update_sites()
        assert c in w.sites and a in w.sites  # c has escalations waiting
        poll(lambda: w.process(w.read_batch()) is None and redis_conn.xlen(names.results_stream(c)) == 2)
        w.update_sites()
        assert c not in w.sites and alive(redis_conn, c, "cloud") == [] and alive(redis_conn, a, "cloud") == [w.sid]
        redis_conn.sadd(names.sites_key(), b)  # an edge announces it again
        w.update_sites()
        assert b in w.sites and alive(redis_conn, b, "cloud") == [w.sid]
    finally:
        w.stop()


@pytest.mark.services
def test_a_site_removed_while_its_edge_runs_is_still_served(stream_setup, brokers, three_sites, redis_conn):
    # Removed from the registry by hand while an aggregator of it is alive (its heartbeat): retiring
    # it would leave what that edge escalates unanswered; the edge announces it again instead.
    a, b, _ = three_sites
    redis_conn.sadd(names.sites_key(), a, b)
    w = worker(stream_setup, brokers, a, sites="*", group=f"g-{a[-8:]}")
    w.connect()
    try:
        redis_conn.set(names.heartbeat_key(b, "edge", "edge-b1"), beat("edge-b1"), ex=60)
        redis_conn.srem(names.sites_key(), b)
        w.update_sites()
        assert b in w.sites and alive(redis_conn, b, "cloud") == [w.sid]
        redis_conn.delete(names.heartbeat_key(b, "edge", "edge-b1"))  # its edge stopped: nothing waits
        w.update_sites()
        assert b not in w.sites
    finally:
        w.stop()


def test_sites_and_their_brokers_are_checked():
    assert CloudConfig(site="x", sites="a, b,a").site_list() == ["a", "b"]
    assert CloudConfig(site="x").site_list() == ["x"] and CloudConfig(sites="*").site_list() == []
    assert CloudConfig(site_mqtt="a=mqtt://h:1,b=mqtt://g:2").mqtt_urls() == {"a": "mqtt://h:1", "b": "mqtt://g:2"}
    for bad in ({"sites": "a,b/c"}, {"site_mqtt": "a"}, {"site_mqtt": "a/b=mqtt://h:1"}):
        with pytest.raises(ValueError):
            CloudConfig(**bad)


@pytest.mark.services
def test_an_idle_worker_of_several_sites_waits_on_all_of_them_at_once(stream_setup, brokers, three_sites, redis_conn):
    # Idle, one blocking read covers every site's stream: an entry of any site ends the wait at
    # once, and with none the read waits its full 200 ms instead of spinning on 1 ms blocks.
    import time

    _, model, _, _, _ = stream_setup
    a, b, c = three_sites
    w = worker(stream_setup, brokers, a, sites=",".join(three_sites))
    w.connect()
    try:
        t0 = time.monotonic()
        assert w.read_batch() == []
        assert time.monotonic() - t0 >= 0.15
        for target in (c, b):
            timer = threading.Timer(0.05, xadd, args=(redis_conn, escalations(model, target, 1)))
            timer.start()
            got = w.read_batch()
            timer.join()
            assert [s for s, _, _ in got] == [target]
            w.process(got)
    finally:
        w.stop()
    assert [len(results(redis_conn, s)) for s in three_sites] == [0, 1, 1]


@pytest.mark.parametrize("cls", ["edge", "cloud"])
def test_a_bad_service_id_is_refused_with_the_config(cls):
    """Refused before anything loads, naming the setting, not later as a bad MQTT client id."""
    from edge.aggregator import EdgeConfig

    config = EdgeConfig if cls == "edge" else CloudConfig
    with pytest.raises(ValueError, match="service_id must match"):
        config(service_id="a/b")
    assert config(service_id="edge-1.a_b").service_id == "edge-1.a_b"


@pytest.mark.services
def test_a_worker_whose_redis_refuses_the_site_registry_stops_with_one_line(stream_setup, brokers, caplog):
    # `ada:sites` of another type (WRONGTYPE) at start: once a traceback, now one line and status 1.
    import urllib.parse

    import redis

    from pipeline.orchestration.cli import main

    u = urllib.parse.urlsplit(brokers[1])
    url = urllib.parse.urlunsplit((u.scheme, u.netloc, "/9", "", ""))  # a database of its own: the registry is global
    r = redis.Redis.from_url(url)
    r.set(names.sites_key(), "not a set")
    try:
        assert main(["cloud", "--sites", "*", "--redis-url", url, "--mqtt-url", brokers[0],
                     "--checkpoint", stream_setup[0], "--device", "cpu"]) == 1
    finally:
        r.delete(names.sites_key())
        r.close()
    assert "ResponseError: WRONGTYPE" in caplog.text and "Traceback" not in caplog.text
