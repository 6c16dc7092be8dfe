import threading

import pytest
import torch

from cloud.worker import CloudConfig, Worker
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.transport.redis_client import alive
from pipeline.wire import names
from pipeline.wire.messages import Decision, Escalation, FeatureTensor
from tests.helpers import wait_results


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
def test_two_workers_and_bad_entries(stream_setup, brokers, site, redis_conn):
    _, model, _, _, _ = stream_setup
    escs = escalations(model, site, 30, dtype="float16")
    ws = [worker(stream_setup, brokers, site, batch=3, wait_ms=2).start() for _ in range(2)]
    try:
        redis_conn.xadd(names.escalations_stream(site), {"frame": 1, "msg": b"not msgpack"})
        xadd(redis_conn, escs)
        got = wait_results(redis_conn, site, 30)
    finally:
        for w in ws:
            w.stop()
    assert sorted(d.frame_id for d in got) == [e.frame_id for e in escs]
    assert len(results(redis_conn, site)) == 30
    assert redis_conn.xlen(names.deadletter_stream(site)) == 1
    assert redis_conn.xlen(names.escalations_stream(site)) == 0
