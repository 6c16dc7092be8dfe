"""`ada-ddnn status` on a live site (a replay running in a thread), and on a site that is not there."""

import threading

import pytest

from pipeline.orchestration.cli import main
from pipeline.orchestration.replay import ReplayConfig, run_replay
from pipeline.orchestration.status import StatusConfig, site_status, table
from tests.helpers import beat

pytestmark = pytest.mark.services



def test_status_of_a_live_site(stream_setup, brokers, site):
    path, model, data, _, _ = stream_setup
    cfg = ReplayConfig(checkpoint=path, mqtt_url=brokers[0], redis_url=brokers[1], site=site, progress=False,
                       cloud_device="cpu", processes=False, n=400, fps=100, deadline_ms=2000, keep_keys=True)
    report: dict = {}
    t = threading.Thread(target=lambda: report.update(run_replay(cfg, data=data, model=model)), daemon=True)
    t.start()
    scfg = StatusConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1])
    live = None
    while t.is_alive():
        st = site_status(scfg)
        if st.decided > 0 and st.aggregators and st.workers and st.cameras:
            live = st
            break
    t.join(120)
    assert live is not None, "never saw the site live: decisions, an aggregator, a worker and cameras at once"
    assert set(live.cameras.values()) <= {"online", "done"} and live.cameras
    assert not live.errors and not live.warnings, (live.errors, live.warnings)
    assert "edge aggregators alive         1" in table(live)
    after = site_status(scfg)  # everything decided, within the window
    assert report["results"] == 400
    assert after.decided == 400
    assert after.rate_fps > 400 / after.window_s  # a rate over the seconds the site has run, not the whole window
    assert {e: n / 400 for e, n in after.exits.items()} == report["exit_rate"]
    assert after.cameras == {k: "done" for k in range(6)}
    assert after.backlog["open_frames"] == 0 and after.backlog["escalations"] == 0


def test_status_json_of_an_empty_site_and_no_broker(brokers, site, capsys):
    assert main(["status", "--site", site, "--mqtt-url", brokers[0], "--redis-url", brokers[1], "--json"]) == 0
    out = capsys.readouterr().out
    assert '"decided": 0' in out and '"aggregators": []' in out
    # Redis not there: a clear error in the table and exit status 1
    assert main(["status", "--site", site, "--mqtt-url", brokers[0], "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "error" in capsys.readouterr().out


def test_forged_camera_statuses_and_heartbeat_keys_are_not_counted(brokers, site, redis_conn):
    """A status on another camera's topic (or of another site) is an error, not a camera; a key
    under the heartbeat prefix that no service could have written is not an aggregator."""
    import paho.mqtt.publish as publish

    from pipeline.transport.mqtt_client import parse_mqtt_url
    from pipeline.wire import names
    from pipeline.wire.messages import CameraStatus

    u = parse_mqtt_url(brokers[0])
    msgs = [(names.status_topic(site, 1), CameraStatus(site, 1, "online", 1.0).encode()),  # genuine
            (names.status_topic(site, 2), CameraStatus(site, 200, "online", 1.0).encode()),  # camera 200 on 2's
            (names.status_topic(site, 3), CameraStatus("elsewhere", 3, "online", 1.0).encode())]  # another site's
    publish.multiple([{"topic": t, "payload": p, "qos": 1, "retain": True} for t, p in msgs], hostname=u.host,
                     port=u.port)
    prefix = names.heartbeat_prefix(site, "edge")
    redis_conn.set(names.heartbeat_key(site, "edge", "agg-1"), beat("agg-1"), ex=60)
    redis_conn.set(prefix + "not a service id!", b"{}", ex=60)
    redis_conn.set(prefix + "x" * 200, b"{}", ex=60)
    # under a service id, but not a heartbeat: no expiry, another type, another body, another id
    redis_conn.set(names.heartbeat_key(site, "edge", "ghost"), beat("ghost"))
    redis_conn.hset(names.heartbeat_key(site, "edge", "hashy"), "a", "b")
    redis_conn.expire(names.heartbeat_key(site, "edge", "hashy"), 60)
    redis_conn.set(names.heartbeat_key(site, "edge", "garbage"), b"garbage", ex=60)
    redis_conn.set(names.heartbeat_key(site, "edge", "never"), b'{"id": "never", "at": "never"}', ex=60)
    redis_conn.set(names.heartbeat_key(site, "edge", "other"), beat("agg-1"), ex=60)
    try:
        st = site_status(StatusConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1]))
        assert st.cameras == {1: "online"}
        assert not st.errors  # both brokers read: malformed or forged data is a warning, not a failed look
        assert len(st.warnings) == 2 and all("speaks on its own topic only" in w for w in st.warnings), st.warnings
        assert st.aggregators == ["agg-1"]
    finally:
        publish.multiple([{"topic": t, "payload": b"", "qos": 1, "retain": True} for t, _ in msgs], hostname=u.host,
                         port=u.port)


def test_a_dead_aggregators_flow_status_is_stale_and_bad_data_is_a_warning(brokers, site, redis_conn, capsys):
    """An aggregator killed leaves its last flow status retained: shown by its service id, marked
    stale. A results entry without its message is a warning: the look itself succeeded (exit 0)."""
    import time

    import paho.mqtt.publish as publish

    from pipeline.transport.mqtt_client import parse_mqtt_url
    from pipeline.wire import names
    from pipeline.wire.control import FlowStatus

    u = parse_mqtt_url(brokers[0])
    topic = names.flow_topic(site, "edge-dead")
    forged = {names.flow_topic(site, "zz"): FlowStatus("othersite", "zz", 99999.0, 5, time.time()),  # another site's
              names.flow_topic(site, "yy"): FlowStatus(site, "edge-dead", 88888.0, 5, time.time())}  # not its topic
    publish.multiple([{"topic": t, "payload": p.encode(), "qos": 1, "retain": True} for t, p in
                      [(topic, FlowStatus(site, "edge-dead", 31.7, 0, time.time() - 100)), *forged.items()]],
                     hostname=u.host, port=u.port)
    redis_conn.xadd(names.results_stream(site), {"frame": 1, "junk": b"x"})
    try:
        assert main(["status", "--site", site, "--mqtt-url", brokers[0], "--redis-url", brokers[1]]) == 0
        out = capsys.readouterr().out
        assert "edge-dead:31.7 (stale: 100 s old" in out
        assert "warning" in out and "no 'msg' field" in out
        assert "99999" not in out and "88888" not in out and out.count("on its own topic only") == 2
    finally:
        publish.multiple([{"topic": t, "payload": b"", "qos": 1, "retain": True} for t in [topic, *forged]],
                         hostname=u.host, port=u.port)


def test_flow_statuses_are_shown_by_the_service_id_of_a_live_aggregator(brokers, site, redis_conn):
    """An aggregator's flow status goes by a digest of its service id (its MQTT client id stays
    secret); status shows the service id that a heartbeat names, and the digest for one not alive."""
    import time

    import paho.mqtt.publish as publish

    from pipeline.transport.mqtt_client import parse_mqtt_url
    from pipeline.wire import names
    from pipeline.wire.control import FlowStatus

    u = parse_mqtt_url(brokers[0])
    live, gone = names.flow_id("edge-a"), names.flow_id("edge-gone")
    topics = [names.flow_topic(site, live), names.flow_topic(site, gone)]
    publish.multiple([{"topic": t, "payload": FlowStatus(site, by, 12.5, 0, time.time()).encode(), "qos": 1,
                       "retain": True} for t, by in zip(topics, (live, gone))], hostname=u.host, port=u.port)
    redis_conn.set(names.heartbeat_key(site, "edge", "edge-a"), beat("edge-a"), ex=60)
    try:
        st = site_status(StatusConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1]))
        assert st.aggregators == ["edge-a"] and st.flow == {"edge-a": 12.5, gone: 12.5}
        assert "edge-a:12.5" in table(st)
    finally:
        publish.multiple([{"topic": t, "payload": b"", "qos": 1, "retain": True} for t in topics], hostname=u.host,
                         port=u.port)


def test_a_key_redis_refuses_is_a_warning_and_the_rest_is_read(brokers, site, redis_conn):
    # One key of another type (WRONGTYPE) once ended the whole look: only an error, no backlog, exit 1.
    from pipeline.wire import names

    redis_conn.set(names.pending_key(site), "garbage")
    redis_conn.zadd(names.awaiting_key(site), {"7": 0, "8": 0})  # frames waiting for their features
    redis_conn.set(names.escalations_stream(site), "garbage")
    st = site_status(StatusConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1]))
    assert not st.errors
    assert "open_frames" not in st.backlog and st.backlog["awaiting_features"] == 2
    assert st.backlog["named_losses"] == 0 and st.backlog["cloud_unacknowledged"] == 0
    assert len(st.warnings) == 3 and all("WRONGTYPE" in w for w in st.warnings), st.warnings
    assert any(line.startswith("backlog: awaiting features") and line.split()[-1] == "2"
               for line in table(st).splitlines())
