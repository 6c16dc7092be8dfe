import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from cloud.worker import CloudConfig, Worker
from edge.aggregator import Aggregator, EdgeConfig, Frame, decide_frames
from edge.exits import decide
from pipeline.checkpoint import thresholds
from pipeline.offline import evaluation
from pipeline.wire import names
from pipeline.wire.messages import (
    EXIT_NAMES,
    CameraFeatures,
    CameraObservation,
    Decision,
    Escalation,
    FeatureTensor,
    summary_of,
)
from tests.helpers import poll, wait_results


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
            out, _, _, _ = decide_frames(model.edge, frames[s:s + batch], t1, t2)
            for i, (exit_name, pred, _, _) in enumerate(out):
                f = s + i
                assert exit_name == EXIT_NAMES[int(ref.exit[f])]
                if exit_name != "cloud":
                    assert pred == int(ref.prediction[f])
    assert {EXIT_NAMES[int(e)] for e in ref.exit} == set(EXIT_NAMES)  # the thresholds exercise every exit


def test_thresholds_from_card(stream_setup):
    path, model, _, t1, t2 = stream_setup
    ada = model.cfg
    assert thresholds(path, ada, None, None) == (t1, t2)
    assert thresholds(path, ada, 0.1, None) == (0.1, t2)
    assert thresholds(path, ada.replace(mode="ddnn"), 0.3, 0.2) == (None, 0.2)  # DDNN has no exit 1


def msg(o: CameraObservation, site: str, frame_id: int | None = None):
    """`o` as received from `site`'s camera (as frame `frame_id`, when given)."""
    o = CameraObservation(site, o.frame_id if frame_id is None else frame_id, o.camera, o.captured_at, o.prediction,
                          o.entropy, o.features, o.label)
    return SimpleNamespace(topic=names.obs_topic(site, o.camera), payload=o.encode(), qos=0, mid=0)


def aggregator(stream_setup, brokers, site, t1=None, **kw):
    """An aggregator of the tiny network with its thresholds (T1 overridden when given)."""
    path, model, _, card_t1, t2 = stream_setup
    cfg = EdgeConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], checkpoint=path, **kw)
    return Aggregator(cfg, model.edge, card_t1 if t1 is None else t1, t2)


def test_the_edge_block_runs_once_before_any_traffic(stream_setup):
    """Its first call sets up the kernels and is slow: made at start, not on the first frames
    (which it would hold past their deadlines, and whose lag would make the cameras shed)."""
    path, model, _, t1, t2 = stream_setup
    calls = []
    hook = model.edge.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        Aggregator(EdgeConfig(site="s", checkpoint=path), model.edge, t1, t2)
    finally:
        hook.remove()
    assert calls == [(2, model.cfg.fused_channels, *model.cfg.wire_shape[1:])]


def make(stream_setup, brokers, site, **kw):
    agg = aggregator(stream_setup, brokers, site, **kw)
    agg.connect()
    return agg


def summary_msgs(obs, site):
    """Lazy upload: each camera's summary of its observation in `obs` (one frame), as received."""
    sums = [summary_of(CameraObservation(site, o.frame_id, o.camera, o.captured_at, o.prediction, o.entropy,
                                         o.features)) for o in obs]
    return [wire_msg(names.obs_topic(site, s.camera), s.encode()) for s in sums]


@pytest.mark.services
def test_a_replay_run_again_over_decided_frames_is_named(stream_setup, brokers, site, caplog):
    """The same frame ids again, captured later (a replay started again on the site): late, since
    the frames were decided, and named once in the log; a resend (old capture times) is no rewind."""
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0, 1, 2])
    again = [CameraObservation(site, o.frame_id, o.camera, o.captured_at + 100, o.prediction, o.entropy, o.features)
             for o in obs[0]]
    agg = make(stream_setup, brokers, site)
    try:
        for f in (0, 1, 2):
            assert len(agg.handle([msg(o, site) for o in obs[f]])) == 1
        agg.handle([msg(o, site) for o in obs[1]])  # resent: same capture times
        assert agg.stats.rewinds == 0 and agg.stats.late == 6
        with caplog.at_level("WARNING", logger="edge.aggregator"):
            assert agg.handle([msg(o, site) for o in again]) == []
        assert agg.stats.rewinds == 6 and agg.stats.late == 12
        lines = [r.getMessage() for r in caplog.records if "frame ids went back" in r.getMessage()]
        assert len(lines) == 1 and "from 2 to 0, captured 100 s later" in lines[0]
    finally:
        agg.close()


@pytest.mark.services
def test_a_running_edge_announces_its_site_again(stream_setup, brokers, site, redis_conn, monkeypatch):
    """Removed from the registry by hand while it runs, the site is back within ANNOUNCE_S: a cloud
    worker serving every site would otherwise retire it and leave its escalations unanswered."""
    import edge.aggregator as aggregator_module

    monkeypatch.setattr(aggregator_module, "ANNOUNCE_S", 0.2)
    agg = aggregator(stream_setup, brokers, site).start()
    try:
        assert redis_conn.sismember(names.sites_key(), site)
        redis_conn.srem(names.sites_key(), site)
        assert poll(lambda: redis_conn.sismember(names.sites_key(), site), timeout_s=10)
    finally:
        agg.stop()
        redis_conn.srem(names.sites_key(), site)


@pytest.mark.services
def test_a_key_overwritten_with_another_type_is_retried_not_fatal(stream_setup, brokers, site, redis_conn, caplog):
    """WRONGTYPE on the counters every script writes: the loop logs it, holds the observations
    (unacknowledged) and retries with backoff; mended, the frame is decided as usual."""
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    redis_conn.set(names.counters_key(site), "oops")
    agg = aggregator(stream_setup, brokers, site).start()
    try:
        for o in obs:
            agg.inbox.put(msg(o, site), agg.mqtt.generation)
        assert poll(lambda: agg.stats.redis_errors >= 1)
        assert agg._thread.is_alive() and agg.stats.claimed == 0
        assert "Redis refused a command" in caplog.text and "WRONGTYPE" in caplog.text
        redis_conn.delete(names.counters_key(site))  # the operator mends it
        assert poll(lambda: agg.stats.claimed == 1, timeout_s=15)
    finally:
        agg.stop()


@pytest.mark.services
def test_assembly_duplicates_late_and_deadline(stream_setup, brokers, site, redis_conn):
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0, 1])
    agg = make(stream_setup, brokers, site, deadline_ms=30)
    try:
        for o in obs[0][:5]:
            assert agg.handle([msg(o, site)]) == []
        assert agg.handle([msg(obs[0][2], site)]) == []  # QoS 1 redelivery
        (frame,) = agg.handle([msg(obs[0][5], site)])  # the sixth camera completes and claims the frame
        assert frame.frame_id == 0 and frame.present == (0, 1, 2, 3, 4, 5)
        assert agg.handle([msg(obs[0][1], site)]) == []  # late: the frame is decided
        for o in obs[1][:4]:  # cameras 4 and 5 are dead
            agg.handle([msg(o, site)])
        (frame,) = poll(agg.claim_expired)
        assert frame.frame_id == 1 and frame.present == (0, 1, 2, 3)
        assert agg.handle([msg(obs[1][5], site)]) == []
        counters = {k.decode(): int(v) for k, v in redis_conn.hgetall(names.counters_key(site)).items()}
        assert counters.pop("observation_bytes") == sum(len(msg(o, site).payload) for o in obs[0] + obs[1][:4])
        late_bytes = len(msg(obs[0][1], site).payload) + len(msg(obs[1][5], site).payload)
        assert counters == {"duplicate_observations": 1, "late": 2, "late_bytes": late_bytes,
                            "deadline_claims": 1}  # frame 1
        assert not redis_conn.exists(names.frame_key(site, 0), names.frame_key(site, 1))
        assert redis_conn.zcard(names.claimed_key(site)) == 2  # claimed, not decided: leased, observations kept
        assert redis_conn.hlen(names.claimed_frame_key(site, 1)) == 4
        assert not agg._decoded  # nothing decoded is kept for a claim that will never come
    finally:
        agg.close()


@pytest.mark.services
def test_summaries_after_an_early_exit1_are_not_kept(stream_setup, brokers, site):
    _, model, data, _, _ = stream_setup
    first, *rest = summary_msgs(observations(model, data, [0])[0], site)
    agg = make(stream_setup, brokers, site, t1=1.0)  # T1 = 1: the first summary takes its frame out at exit 1
    try:
        (frame,) = agg.handle([first])
        assert frame.frame_id == 0 and frame.present == (0,)
        for m in rest:  # the other cameras' summaries come after the frame left
            assert agg.handle([m]) == []
        assert not agg._decoded  # none of them waits in the decode cache for a claim
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
                claimed[i].extend(fr.frame_id for fr in aggs[i].handle([msg(o, site)]))
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
    raw = [agg._escalation(fr, fused, 0.9, 1) for fr in frames]
    stop = threading.Event()
    try:
        agg.escalate([(frames[0], raw[0]), (frames[1], raw[1])], stop)
        t = threading.Thread(target=agg.escalate, args=([(frames[2], raw[2])], stop))
        t.start()
        t.join(0.3)
        assert t.is_alive() and redis_conn.xlen(names.escalations_stream(site)) == 2  # waiting, nothing trimmed
        first = redis_conn.xrange(names.escalations_stream(site), count=1)[0][0]
        redis_conn.xdel(names.escalations_stream(site), first)  # the cloud finished one
        t.join(10)
        assert not t.is_alive()
        ids = [Escalation.decode(f[b"msg"]).frame_id for _, f in redis_conn.xrange(names.escalations_stream(site))]
        assert ids == [1, 2] and agg.stats.backpressure_waits >= 1
    finally:
        stop.set()
        agg.close()


@pytest.mark.services
def test_malformed_observation_goes_to_the_dead_letters(stream_setup, brokers, site, redis_conn):
    agg = make(stream_setup, brokers, site)
    try:
        assert agg.handle([SimpleNamespace(topic=names.obs_topic(site, 0), payload=b"\x93garbage", qos=0, mid=0)]) == []
        wrong = CameraObservation(site, 1, 0, 1.0, 1, 0.5, FeatureTensor.quantize(torch.ones(3, 2, 2)))
        assert agg.handle([SimpleNamespace(topic=names.obs_topic(site, 0), payload=wrong.encode(), qos=0, mid=0)]) == []
        letters = redis_conn.xrange(names.deadletter_stream(site))
        assert len(letters) == 2
        assert b"msgpack" in letters[0][1][b"reason"] or b"map" in letters[0][1][b"reason"]
        assert b"frame 1 camera 0" in letters[1][1][b"reason"]
    finally:
        agg.close()


def collect_claims(agg, expect, timeout_s=10.0):
    """{frame id: Frame} that `agg` claims through its deadline/lease scan, until `expect` ids are there."""
    got: dict[int, Frame] = {}

    def scan():
        got.update((fr.frame_id, fr) for fr in agg.claim_expired())
        return set(got) >= set(expect)

    assert poll(scan, timeout_s), f"claimed {sorted(got)}, expected {sorted(expect)}"
    return got


def stream_frame_ids(r, stream):
    return [int(f[b"frame"]) for _, f in r.xrange(stream)]


def assert_no_lease_left(r, site):
    assert r.zcard(names.claimed_key(site)) == 0
    assert not list(r.scan_iter(match=names.claimed_frame_key(site, 0)[:-1] + "*"))


def claim_all(agg, model, data, site, n, dead_camera_every=5):
    """Feed frames 0..n-1 to `agg` (camera 3 dead on every fifth frame) and claim them all, deciding none."""
    obs = observations(model, data, list(range(n)))
    claimed: dict[int, Frame] = {}
    for f in range(n):
        for o in obs[f]:
            if not (f % dead_camera_every == 0 and o.camera == 3):
                claimed.update((fr.frame_id, fr) for fr in agg.handle([msg(o, site)]))
    claimed.update(collect_claims(agg, range(n)))  # the incomplete frames, past their deadline
    return claimed


@pytest.mark.services
def test_frames_of_a_crashed_aggregator_are_reclaimed_and_decided_once(stream_setup, brokers, site, redis_conn):
    """An aggregator claims every frame and dies before deciding any; a second one takes over
    their leases once they expire, and every frame gets exactly one result (cloud included)."""
    _, model, data, t1, t2 = stream_setup
    n = 30
    dead = make(stream_setup, brokers, site, deadline_ms=20, claim_lease_ms=50)
    claimed = claim_all(dead, model, data, site, n)
    dead.close()  # the crash: claimed, never decided
    assert sorted(claimed) == list(range(n))
    assert redis_conn.zcard(names.claimed_key(site)) == n and redis_conn.xlen(names.results_stream(site)) == 0

    survivor = aggregator(stream_setup, brokers, site, deadline_ms=20).start()
    cloud = Worker(CloudConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], device="cpu", wait_ms=2),
                   model.cloud).start()
    try:
        got = wait_results(redis_conn, site, n)
    finally:
        survivor.stop()
        cloud.stop()
    assert sorted(d.frame_id for d in got) == list(range(n))
    assert len(stream_frame_ids(redis_conn, names.results_stream(site))) == n  # nothing recorded twice
    assert survivor.stats.reclaimed == n
    assert int(redis_conn.hget(names.counters_key(site), "reclaimed")) >= n  # the dead one may have renewed its own
    assert_no_lease_left(redis_conn, site)
    # the observations survived the crash: the survivor decided what the dead one would have
    frames = [claimed[f] for f in range(n)]
    expect, _, _, _ = decide_frames(model.edge, frames, t1, t2)
    by_id = {d.frame_id: d for d in got}
    assert {e for e, _, _, _ in expect} >= {"exit2", "cloud"}
    for fr, (exit_name, pred, _, _) in zip(frames, expect):
        d = by_id[fr.frame_id]
        assert d.present == fr.present and d.exit == exit_name
        assert d.by == (cloud.sid if exit_name == "cloud" else survivor.sid)
        if exit_name != "cloud":
            assert d.prediction == pred


@pytest.mark.services
@pytest.mark.parametrize("race", [False, True], ids=["in-turn", "concurrent"])
def test_a_slow_owner_after_a_takeover_changes_nothing(stream_setup, brokers, site, redis_conn, race):
    """The owner is slow, not dead: its lease is taken over and both decide the frames. Each frame
    still gets one result or one escalation (never both, never two), and the cloud answers once."""
    _, model, data, _, _ = stream_setup
    n = 30
    slow = make(stream_setup, brokers, site, deadline_ms=20, claim_lease_ms=50)
    taker = make(stream_setup, brokers, site, deadline_ms=20)  # the default lease: it keeps what it takes
    stop = threading.Event()
    try:
        mine = claim_all(slow, model, data, site, n)
        taken = collect_claims(taker, range(n))  # every lease of the slow owner expired
        assert all(fr.reclaimed for fr in taken.values()) and taker.stats.reclaimed == n
        assert [fr.present for fr in taken.values()] == [mine[f].present for f in taken]
        if race:
            threads = [threading.Thread(target=a.decide_and_send, args=([fs[f] for f in range(n)], stop))
                       for a, fs in ((slow, mine), (taker, taken))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        else:  # the taker first on even frames, the slow owner first on odd ones
            taker.decide_and_send([taken[f] for f in range(0, n, 2)], stop)
            slow.decide_and_send([mine[f] for f in range(n)], stop)
            taker.decide_and_send([taken[f] for f in range(1, n, 2)], stop)
    finally:
        stop.set()
        slow.close()
        taker.close()
    recorded = stream_frame_ids(redis_conn, names.results_stream(site))
    escalated = stream_frame_ids(redis_conn, names.escalations_stream(site))
    assert recorded and escalated
    assert len(set(recorded)) == len(recorded) and len(set(escalated)) == len(escalated)
    assert sorted(recorded + escalated) == list(range(n))  # one end per frame
    counters = {k.decode(): int(v) for k, v in redis_conn.hgetall(names.counters_key(site)).items()}
    assert counters.get("result_conflicts", 0) + counters.get("escalation_conflicts", 0) == n  # each second try refused
    assert_no_lease_left(redis_conn, site)

    cloud = Worker(CloudConfig(site=site, mqtt_url=brokers[0], redis_url=brokers[1], device="cpu", wait_ms=2),
                   model.cloud).start()
    try:
        got = wait_results(redis_conn, site, n)
    finally:
        cloud.stop()
    assert sorted(d.frame_id for d in got) == list(range(n))
    results = [Decision.decode(f[b"msg"]) for _, f in redis_conn.xrange(names.results_stream(site))]
    assert sorted(d.frame_id for d in results) == list(range(n))  # exactly one result per frame
    assert redis_conn.xlen(names.escalations_stream(site)) == 0


def wire_msg(topic: str, payload: bytes):
    return SimpleNamespace(topic=topic, payload=payload, qos=0, mid=0)


@pytest.mark.services
def test_answers_received_before_the_deadline_sweep_are_not_judged_missing(stream_setup, brokers, site):
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    # T1 = 0: no exit 1, every frame's features are asked for
    agg = make(stream_setup, brokers, site, t1=0.0, request_deadline_ms=20)
    try:
        (frame,) = agg.handle(summary_msgs(obs, site))
        assert frame.wanted == (0, 1, 2, 3, 4, 5) and not frame.requested
        agg.request_features([frame])
        for o in obs:  # every answer reaches the inbox while the loop is busy elsewhere ...
            agg.inbox.put(wire_msg(names.features_topic(site, o.camera),
                                   CameraFeatures(site, 0, o.camera, o.features).encode()), 0)
        time.sleep(0.1)  # ... until after the second deadline (20 ms)
        (frame,) = agg.sweep()
        assert frame.requested and frame.present == (0, 1, 2, 3, 4, 5) and frame.missing == ()
        assert agg.claim_expired() == [] and len(agg.inbox) == 0
    finally:
        agg.close()


@pytest.mark.services
def test_a_request_goes_out_before_its_wait_is_registered(stream_setup, brokers, site, monkeypatch):
    """The Redis round trip that registers the wait is off the frame's latency path."""
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    agg = make(stream_setup, brokers, site, t1=0.0)
    order = []
    publish, request = agg.mqtt.publish, agg.store.request
    monkeypatch.setattr(agg.mqtt, "publish",
                        lambda topic, raw, *a, **kw: (order.append(topic), publish(topic, raw, *a, **kw))[1])
    monkeypatch.setattr(agg.store, "request", lambda *a, **kw: (order.append("registered"), request(*a, **kw))[1])
    try:
        (frame,) = agg.handle(summary_msgs(obs, site))
        agg.decide_and_send([frame], threading.Event())
        assert order == [names.request_topic(site), "registered"]
        assert agg.store.request([(0, frame.wanted, 1)], 1000) == ["already"]  # registered: awaiting its answers
    finally:
        agg.close()


@pytest.mark.services
def test_an_aggregator_that_dies_after_asking_leaves_its_frame_the_answers(stream_setup, brokers, site, redis_conn):
    """The request goes out before the wait is registered; the owner dies in between, while
    another aggregator (the answers' shared subscription) stores the cameras' answers. The lease
    hands the frame on with them: it is decided with every camera's features, none named."""
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    # T1 = 0: no exit 1, the frame's features are asked for
    dead = make(stream_setup, brokers, site, t1=0.0, claim_lease_ms=50)
    other = make(stream_setup, brokers, site, t1=0.0)
    stop = threading.Event()
    try:
        (frame,) = dead.handle(summary_msgs(obs, site))
        assert not frame.requested and frame.wanted == (0, 1, 2, 3, 4, 5)
        answers = [wire_msg(names.features_topic(site, o.camera),
                            CameraFeatures(site, 0, o.camera, o.features).encode()) for o in obs]
        assert other.handle(answers) == []  # stored for a wait not registered yet
        dead.close()  # the crash: asked, never registered
        (taken,) = collect_claims(other, [0]).values()
        assert taken.reclaimed and not taken.requested and taken.present == (0, 1, 2, 3, 4, 5)
        other.decide_and_send([taken], stop)
    finally:
        stop.set()
        other.close()
    ends = (stream_frame_ids(redis_conn, names.results_stream(site))
            + stream_frame_ids(redis_conn, names.escalations_stream(site)))
    assert ends == [0] and redis_conn.xlen(names.losses_stream(site)) == 0
    assert other.stats.requests == 0  # nothing asked twice


@pytest.mark.services
def test_no_camera_alone_can_run_ahead_of_the_others(stream_setup, brokers, site, redis_conn):
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    agg = make(stream_setup, brokers, site, admit_window=100, deadline_ms=60_000)
    try:
        agg.handle([msg(obs[0], site), msg(obs[1], site)])  # cameras 0 and 1 reached frame 0
        o = obs[2]
        far = CameraObservation(site, 101, 2, 1.0, o.prediction, o.entropy, o.features, o.label)
        near = CameraObservation(site, 100, 2, 1.0, o.prediction, o.entropy, o.features, o.label)
        assert agg.handle([wire_msg(names.obs_topic(site, 2), far.encode())]) == []
        assert agg.stats.ahead == 1
        (letter,) = redis_conn.xrange(names.deadletter_stream(site))
        assert b"frame 101 camera 2" in letter[1][b"reason"] and b"ahead" in letter[1][b"reason"]
        agg.handle([wire_msg(names.obs_topic(site, 2), near.encode())])  # within the window: stored
        assert redis_conn.hexists(names.frame_key(site, 100), 2)
        assert not redis_conn.exists(names.frame_key(site, 101))
        assert int(redis_conn.hget(names.counters_key(site), "ahead")) == 1
    finally:
        agg.close()


@pytest.mark.services
def test_refused_ids_do_not_move_the_admission_window(stream_setup, brokers, site, redis_conn):
    # Two forged far-ahead ids on two cameras: each is refused, and neither becomes its camera's
    # front (else the second, with the first as "second most advanced", would be admitted).
    _, model, data, _, _ = stream_setup
    obs = observations(model, data, [0])[0]
    agg = make(stream_setup, brokers, site, admit_window=100, deadline_ms=60_000)
    try:
        agg.handle([msg(obs[0], site), msg(obs[1], site)])  # cameras 0 and 1 reached frame 0
        far = 1 << 62
        for k in (2, 3, 2, 3):
            o = obs[k]
            forged = CameraObservation(site, far, k, 1.0, o.prediction, o.entropy, o.features, o.label)
            assert agg.handle([wire_msg(names.obs_topic(site, k), forged.encode())]) == []
        assert agg.stats.ahead == 4 and not redis_conn.exists(names.frame_key(site, far))
        assert sorted(redis_conn.hkeys(names.front_key(site))) == [b"0", b"1"]
    finally:
        agg.close()


@pytest.mark.services
def test_a_shed_notice_for_a_claimed_frame_names_no_loss(stream_setup, brokers, site, redis_conn):
    # A camera process restarted on a running clock sheds the frames due before it started, some
    # of which its predecessor sent: a frame claimed already keeps its decision's `present` as the
    # only word on its cameras; the frames not claimed yet are named.
    from pipeline.wire.control import ShedNotice

    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, deadline_ms=60_000)
    try:
        claimed = agg.handle([msg(o, site) for o in observations(model, data, [0])[0]])  # all six: claimed
        assert [fr.frame_id for fr in claimed] == [0]
        agg.handle([wire_msg(names.shed_topic(site, 3), ShedNotice(site, 3, (0, 1), "behind", 1.0).encode())])
        losses = [(int(f[b"frame"]), int(f[b"camera"])) for _, f in redis_conn.xrange(names.losses_stream(site))]
        counters = redis_conn.hgetall(names.counters_key(site))
        assert losses == [(1, 3)] and agg.stats.shed == 1
        assert int(counters[b"shed"]) == 1 and int(counters[b"shed_after_claim"]) == 1
    finally:
        agg.close()


@pytest.mark.services
def test_views_shed_before_later_frames_of_the_same_batch_are_named(stream_setup, brokers, site, redis_conn):
    # Every camera sheds frames 1..3 and then sends frame 4; an edge that was paused takes it all in
    # one batch, observations first: frame 4 moves the cameras past the ids they shed, which are
    # named lost all the same (before, 17 of 20 such frames ended neither decided nor named).
    from pipeline.wire.control import ShedNotice

    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, deadline_ms=60_000, admit_window=256)
    try:
        obs = observations(model, data, [0, 4])
        agg.handle([msg(o, site) for o in obs[0]])
        batch = [wire_msg(names.shed_topic(site, k), ShedNotice(site, k, (1, 2, 3), "behind", 1.0).encode())
                 for k in range(6)]
        claimed = agg.handle(batch + [msg(o, site) for o in obs[4]])
        assert [fr.frame_id for fr in claimed] == [4]
        losses = sorted((int(f[b"frame"]), int(f[b"camera"])) for _, f in redis_conn.xrange(names.losses_stream(site)))
        assert losses == [(f, k) for f in (1, 2, 3) for k in range(6)] and agg.stats.shed == 18
    finally:
        agg.close()


@pytest.mark.services
def test_the_cameras_moving_on_together_are_admitted(stream_setup, brokers, site, redis_conn):
    # An edge back from an outage longer than the admission window (or a broker that dropped its
    # queue) finds every camera far beyond the fronts it knows: refused ids are marked, and once a
    # majority of the cameras (4 of 6) is there, the site moves on instead of stalling for good.
    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, admit_window=100, deadline_ms=60_000)
    try:
        obs = observations(model, data, [0, 1, 2])
        agg.handle([msg(o, site) for o in obs[0]])  # every camera reached frame 0
        far = 1000
        jumped = [msg(o, site, far) for o in obs[1]]
        for m in jumped[:3]:
            assert agg.handle([m]) == []
        assert agg.stats.ahead == 3 and not redis_conn.exists(names.frame_key(site, far))
        for m in jumped[3:]:
            assert agg.handle([m]) == []
        # the fourth is admitted by the majority, and moves its front: the last two are within the window
        assert agg.stats.ahead == 3 and redis_conn.hlen(names.frame_key(site, far)) == 3
        assert int(redis_conn.hget(names.counters_key(site), "ahead_admitted")) == 1
        assert not redis_conn.exists(names.gaps_key(site))  # 3 of 6 at 1000: no majority past the ids yet
        agg.handle([msg(obs[2][0], site, far + 1)])
        assert redis_conn.zcard(names.gaps_key(site)) == far - 1  # 4 of 6 past them: named lost unless they come
    finally:
        agg.close()


@pytest.mark.services
def test_a_stored_message_that_does_not_decode_dead_letters_its_frame(stream_setup, brokers, site, redis_conn):
    # Something else wrote into a frame's hash (or an older wire version did, before an upgrade):
    # the sweep that claims it dead-letters that frame alone and releases it, instead of failing
    # on it, and failing again in every aggregator that takes its lease over.
    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, deadline_ms=1)
    try:
        redis_conn.hset(names.frame_key(site, 5), "1", b"\x93garbage")
        redis_conn.zadd(names.pending_key(site), {5: 0})
        agg.handle([msg(o, site) for o in observations(model, data, [0])[0][:2]])  # frame 0: two cameras
        frames = poll(lambda: agg.sweep())
        assert [fr.frame_id for fr in frames] == [0]
        (letter,) = [f[b"reason"] for _, f in redis_conn.xrange(names.deadletter_stream(site))]
        assert b"frame 5: a stored message does not decode" in letter
        assert not redis_conn.exists(names.claimed_frame_key(site, 5))
        assert redis_conn.zscore(names.claimed_key(site), 5) is None
    finally:
        agg.close()


@pytest.mark.services
def test_after_redis_lost_its_data_the_site_and_session_are_announced_again(stream_setup, brokers, site, redis_conn,
                                                                            caplog):
    # Redis restarted without persistence: the scripts are gone (NOSCRIPT), and so are the site's
    # entry in the registry (cloud --sites '*') and the aggregator's session (take-over).
    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site, service_id=f"{site}-e", session_expiry_s=60)
    try:
        assert redis_conn.sismember(names.sites_key(), site)
        assert redis_conn.hexists(names.edge_sessions_key(site), f"{site}-e")
        redis_conn.script_flush()
        redis_conn.srem(names.sites_key(), site)
        redis_conn.delete(names.edge_sessions_key(site))
        with caplog.at_level("ERROR", logger="edge.aggregator"):
            agg.handle([msg(o, site) for o in observations(model, data, [0])[0][:2]])
        assert redis_conn.hlen(names.frame_key(site, 0)) == 2  # stored, once the scripts were loaded again
        assert redis_conn.sismember(names.sites_key(), site)
        assert redis_conn.hexists(names.edge_sessions_key(site), f"{site}-e")
        assert any("Redis restarted without its data" in r.getMessage() for r in caplog.records)
    finally:
        agg.close()
        redis_conn.srem(names.sites_key(), site)


@pytest.mark.services
def test_shed_notices_become_named_losses(stream_setup, brokers, site, redis_conn):
    from pipeline.wire.control import ShedNotice

    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site)
    try:
        notice = ShedNotice(site, 3, (10, 12, 11, 12, 12), "overload", 1.0)  # a repeated id is one loss
        forged = ShedNotice(site, 4, (13,), "overload", 1.0)  # camera 4's notice on camera 3's topic
        beyond = ShedNotice(site, 9, (14,), "overload", 1.0)  # a camera the six-camera network does not have
        agg.handle([wire_msg(names.shed_topic(site, 3), notice.encode()),
                    wire_msg(names.shed_topic(site, 3), forged.encode()),
                    wire_msg(names.shed_topic(site, 9), beyond.encode())])
        losses = [(int(f[b"frame"]), int(f[b"camera"]), f[b"why"]) for _, f in
                  redis_conn.xrange(names.losses_stream(site))]
        assert losses == [(10, 3, b"overload"), (11, 3, b"overload"), (12, 3, b"overload")]
        assert int(redis_conn.hget(names.counters_key(site), "shed")) == 3
        letters = [f[b"reason"] for _, f in redis_conn.xrange(names.deadletter_stream(site))]
        assert len(letters) == 2 and b"beyond the network's 6 cameras" in letters[1]
        # ids far beyond what the cameras reached are refused, not named: no device fills the losses
        agg.handle([msg(o, site) for o in observations(model, data, [0])[0][:2]])  # two cameras at frame 0
        far = ShedNotice(site, 2, tuple(range(2**63 - 4096, 2**63)), "overload", 1.0)
        agg.handle([wire_msg(names.shed_topic(site, 2), far.encode())])
        assert redis_conn.xlen(names.losses_stream(site)) == 3
        assert int(redis_conn.hget(names.counters_key(site), "shed_ahead")) == 4096
        letters = [f[b"reason"] for _, f in redis_conn.xrange(names.deadletter_stream(site))]
        assert len(letters) == 3 and b"and 4095 more), more than 256 frames ahead" in letters[2]
    finally:
        agg.close()


def test_a_frame_with_non_finite_numbers_is_refused_alone(stream_setup):
    from edge.decisions import REFUSED

    _, model, data, t1, t2 = stream_setup
    obs = observations(model, data, [0, 1, 2])
    shape = model.cfg.wire_shape
    poisoned = SimpleNamespace(camera=0, entropy=obs[1][0].entropy, prediction=obs[1][0].prediction,
                               captured_at=1.0, label=None,
                               features=SimpleNamespace(to_tensor=lambda: torch.full(shape, float("inf"))))
    frames = [Frame(0, obs[0]), Frame(1, [poisoned, *obs[1][1:]]), Frame(2, obs[2])]
    out, _, _, _ = decide_frames(model.edge, frames, t1, t2)
    clean, _, _, _ = decide_frames(model.edge, [frames[0], frames[2]], t1, t2)
    assert out[1][0] == REFUSED
    assert [out[0][:2], out[2][:2]] == [clean[0][:2], clean[1][:2]]  # its batch-mates decided as without it


def test_one_camera_sending_many_stale_messages_weighs_as_one_camera():
    from edge.aggregator import site_lag

    fair = [(k, 20.0 + k) for k in range(6)]
    assert site_lag(fair) == 22.5
    assert site_lag(fair + [(5, 100_000.0)] * 500) == 22.5  # camera 5 floods stale summaries: its median moves, not the site's
    assert site_lag([(0, 10.0), (0, 30.0), (0, 50.0)]) == 30.0


def test_a_camera_with_a_wrong_clock_does_not_set_the_sites_lag(stream_setup, brokers, site, caplog):
    # Camera 2 booted without its clock (1970) and camera 4 runs an hour ahead: their frames are
    # still taken in, but only the plausible delays reach the flow status, and both are named.
    _, model, data, _, _ = stream_setup
    agg = make(stream_setup, brokers, site)
    try:
        now = time.time()
        obs = observations(model, data, [0, 1])
        clocks = {2: 1.0, 4: now + 3600}
        batch = [msg(CameraObservation(o.site, o.frame_id, o.camera, clocks.get(o.camera, now - 0.02), o.prediction,
                                       o.entropy, o.features, o.label), site) for f in (0, 1) for o in obs[f]]
        with caplog.at_level("WARNING", logger="edge.aggregator"):
            agg.handle(batch)
        assert agg.stats.observations == 12 and agg.stats.clock_skewed == 4
        assert len(agg._lags) == 8 and all(0 <= lag < 5_000 for _, lag in agg._lags)
        named = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
        assert len(named) == 2  # once per camera, not per observation
        assert any("camera 2:" in m and "before" in m for m in named)
        assert any("camera 4:" in m and "after" in m for m in named)
    finally:
        agg.close()


@pytest.mark.parametrize("alone", [True, False])
def test_a_stopped_aggregator_with_a_stable_id_loses_nothing_sent_while_it_is_away(stream_setup, brokers, site, alone):
    # The site's last aggregator keeps its shared subscriptions on stopping, so the broker queues
    # for its session what the cameras publish meanwhile; with another aggregator alive it
    # unsubscribes, and the other one gets the observations at once.
    from pipeline.transport.mqtt_client import close_mqtt, mqtt_client

    _, model, data, _, _ = stream_setup
    sid = f"{site}-e1"[-60:]
    agg = make(stream_setup, brokers, site, service_id=sid)
    other = None if alone else make(stream_setup, brokers, site)
    agg.close()
    cam = mqtt_client(brokers[0], f"{site}-pub")
    try:
        for o in observations(model, data, [3])[3]:
            cam.publish(names.obs_topic(site, o.camera), msg(o, site).payload, qos=1)
        assert cam.wait_confirmed(10)
        back = make(stream_setup, brokers, site, service_id=sid)
        try:
            receiver = back if alone else other
            got = poll(lambda: len(receiver.inbox) >= 6, 10)
            assert got, f"{len(receiver.inbox)} of 6 observations reached the {'restarted' if alone else 'other'} aggregator"
            receiver._held = receiver.inbox.take(64, 1)
            assert [fr.frame_id for fr in receiver.ingest()] == [3]
            assert len(back.inbox) == 0 or alone
        finally:
            back.close()
    finally:
        close_mqtt(cam)
        if other is not None:
            other.close()


def test_every_shed_notice_is_told_in_a_log_line(stream_setup, caplog):
    # One line a second at most: the notices of a quiet second were never logged when no later
    # line came (the losses stream held 168 views named, the log told of 28).
    import re

    path, model, _, t1, t2 = stream_setup
    agg = Aggregator(EdgeConfig(site="s", checkpoint=path), model.edge, t1, t2)
    agg._note_shed([(f, 5, "camera", "behind") for f in range(10, 38)], 28, 0)  # a line at once
    agg._note_shed([(f, k, "camera", "behind") for f in range(38, 66) for k in range(5)], 140, 0)  # within the second
    told = [int(n) for n in re.findall(r"shed (\d+) views", caplog.text)]
    assert told == [28]
    agg._say_shed(now=True)  # what close() does (and the run loop, a second later)
    told = [int(n) for n in re.findall(r"shed (\d+) views", caplog.text)]
    assert told == [28, 140] and "cameras [0, 1, 2, 3, 4] shed 140 views (behind) of frames 38..65" in caplog.text
