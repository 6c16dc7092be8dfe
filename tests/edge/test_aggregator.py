import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from edge.aggregator import Aggregator, EdgeConfig, Frame, decide_frames, thresholds_from_card
from edge.exits import EXIT_NAMES, decide
from pipeline import evaluation, topics
from pipeline.messages import CameraObservation, Escalation, FeatureTensor


def observations(model, data, frame_ids, dtype="int8"):
    """{frame: [CameraObservation per camera]} from the offline camera pass."""
    split = data.test.head(max(frame_ids) + 1)
    cams = evaluation.camera_pass(model, split, batch_size=64, wire_dtype=None)
    return {f: [CameraObservation("s", f, k, 1.0, int(cams.cam_pred[f, k]), float(cams.cam_entropy[f, k]),
                                  FeatureTensor.quantize(cams.features[f, k], dtype), int(split.labels[f]))
                for k in range(model.cfg.num_cameras)] for f in frame_ids}


def test_decide_frames_equals_offline(stream_setup):
    _, model, data, t1, t2 = stream_setup
    ids = list(range(40))
    obs = observations(model, data, ids)
    g = torch.Generator().manual_seed(1)
    present = torch.rand(40, 6, generator=g) > 0.3
    present[:, 0] |= ~present.any(dim=1)
    frames = [Frame(f, [o for o in obs[f] if present[f, o.camera]]) for f in ids]
    cams = evaluation.camera_pass(model, data.test.head(40), batch_size=40, wire_dtype="int8")
    c = evaluation.fuse_pass(model, cams, present, batch_size=40)
    ref = decide(t1, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred, c.present)
    for batch, upto in ((1, 8), (3, 40), (40, 40)):
        for s in range(0, upto, batch):
            out, _, _, _ = decide_frames(model, frames[s:s + batch], t1, t2)
            for i, (exit_name, pred, _, _) in enumerate(out):
                f = s + i
                assert exit_name == EXIT_NAMES[int(ref.exit[f])]
                if exit_name != "cloud":
                    assert pred == int(ref.prediction[f])
    assert {EXIT_NAMES[int(e)] for e in ref.exit} == set(EXIT_NAMES)  # the thresholds exercise every exit


def test_thresholds_from_card(stream_setup):
    path, _, _, t1, t2 = stream_setup
    assert thresholds_from_card(path, None, None, "ada") == (t1, t2)
    assert thresholds_from_card(path, 0.1, None, "ada") == (0.1, t2)
    assert thresholds_from_card(path, None, 0.2, "ddnn") == (None, 0.2)


def msg(o: CameraObservation, site: str):
    o = CameraObservation(site, o.frame_id, o.camera, o.captured_at, o.prediction, o.entropy, o.features, o.label)
    return SimpleNamespace(topic=topics.obs_topic(site, o.camera), payload=o.encode())


def make(stream_setup, brokers, site, **kw):
    path, model, _, t1, t2 = stream_setup
    cfg = EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, **kw)
    agg = Aggregator(cfg, model, t1, t2)
    agg.connect()
    return agg


def poll(fn, timeout_s=5.0):
    """fn() until it returns something truthy; deadlines are wall-clock, so there is no event to await."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        out = fn()
        if out:
            return out
        time.sleep(0.01)
    return fn()


@pytest.mark.services
def test_assembly_duplicates_late_and_deadline(stream_setup, brokers, site, redis_conn):
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0, 1])
    agg = make(stream_setup, brokers, site, deadline_ms=30)
    try:
        for o in obs[0][:5]:
            assert agg.handle(msg(o, site)) == []
        assert agg.handle(msg(obs[0][2], site)) == []  # QoS 1 redelivery
        (frame,) = agg.handle(msg(obs[0][5], site))  # the sixth camera completes and claims the frame
        assert frame.frame_id == 0 and frame.present == (0, 1, 2, 3, 4, 5)
        assert agg.handle(msg(obs[0][1], site)) == []  # late: the frame is decided
        for o in obs[1][:4]:  # cameras 4 and 5 are dead
            agg.handle(msg(o, site))
        (frame,) = poll(agg.claim_expired)
        assert frame.frame_id == 1 and frame.present == (0, 1, 2, 3)
        assert agg.handle(msg(obs[1][5], site)) == []
        counters = {k.decode(): int(v) for k, v in redis_conn.hgetall(topics.counters_key(site)).items()}
        assert counters == {"duplicate_observations": 1, "late": 2}
        assert not redis_conn.exists(topics.frame_key(site, 0), topics.frame_key(site, 1))
    finally:
        agg.close()


@pytest.mark.services
def test_two_aggregators_claim_each_frame_once(stream_setup, brokers, site):
    _, model, data, _, _ = stream_setup
    n = 40
    obs = observations(model, data, list(range(n)))
    aggs = [make(stream_setup, brokers, site, deadline_ms=40) for _ in range(2)]
    rng = random.Random(0)
    deliveries = [(rng.randrange(2), o) for f in range(n) for o in obs[f] if not (f % 5 == 0 and o.camera == 3)]
    deliveries += [(rng.randrange(2), o) for o, in rng.sample([(o,) for f in range(n) for o in obs[f]], 60)]  # QoS 1 dups
    rng.shuffle(deliveries)  # reordered across frames and cameras
    claimed: list[list[int]] = [[], []]

    def run(i):
        for who, o in deliveries:
            if who == i:
                claimed[i].extend(fr.frame_id for fr in aggs[i].handle(msg(o, site)))
        end = time.monotonic() + 5
        while time.monotonic() < end and len(claimed[0]) + len(claimed[1]) < n:
            claimed[i].extend(fr.frame_id for fr in aggs[i].claim_expired())
            time.sleep(0.005)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for a in aggs:
            a.close()
    both = claimed[0] + claimed[1]
    assert sorted(both) == list(range(n))  # none lost, none twice


@pytest.mark.services
def test_escalation_backpressure_never_trims(stream_setup, brokers, site, redis_conn):
    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, escalation_maxlen=2)
    obs = observations(model, data, [0, 1, 2])
    frames = [Frame(f, obs[f]) for f in range(3)]
    fused = torch.zeros(model.cfg.fused_channels, *model.cfg.wire_shape[1:])
    stop = threading.Event()
    try:
        agg.escalate(frames[0], fused, 0.9, 1, stop)
        agg.escalate(frames[1], fused, 0.9, 1, stop)
        t = threading.Thread(target=agg.escalate, args=(frames[2], fused, 0.9, 1, stop))
        t.start()
        t.join(0.3)
        assert t.is_alive() and redis_conn.xlen(topics.escalations_stream(site)) == 2  # waiting, nothing trimmed
        first = redis_conn.xrange(topics.escalations_stream(site), count=1)[0][0]
        redis_conn.xdel(topics.escalations_stream(site), first)  # the cloud finished one
        t.join(10)
        assert not t.is_alive()
        ids = [Escalation.decode(f[b"msg"]).frame_id for _, f in redis_conn.xrange(topics.escalations_stream(site))]
        assert ids == [1, 2] and agg.stats.backpressure_waits >= 1
    finally:
        stop.set()
        agg.close()


@pytest.mark.services
def test_malformed_observation_goes_to_the_dead_letters(stream_setup, brokers, site, redis_conn):
    agg = make(stream_setup, brokers, site)
    try:
        assert agg.handle(SimpleNamespace(topic=topics.obs_topic(site, 0), payload=b"\x93garbage")) == []
        wrong = CameraObservation(site, 1, 0, 1.0, 1, 0.5, FeatureTensor.quantize(torch.ones(3, 2, 2)))
        assert agg.handle(SimpleNamespace(topic=topics.obs_topic(site, 0), payload=wrong.encode())) == []
        letters = redis_conn.xrange(topics.deadletter_stream(site))
        assert len(letters) == 2
        assert b"msgpack" in letters[0][1][b"reason"] or b"map" in letters[0][1][b"reason"]
        assert b"frame 1 camera 0" in letters[1][1][b"reason"]
    finally:
        agg.close()
