"""Hypothesis at a running aggregator: over 5,000 random and mutated messages on the camera topics
(bytes flipped, truncated, fields of the wrong type, version 1.0 / True, huge ids, wrong topics,
forged shed notices), then a batch of valid frames whose decisions must equal offline evaluation
of the same frames with the same cameras, with the edge alive and its memory bounded."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edge.exits import decide
from pipeline.offline import evaluation
from pipeline.wire import names
from pipeline.wire.control import ShedNotice
from pipeline.wire.messages import EXIT_NAMES, MAX_FRAME_ID, WIRE_VERSION, CameraObservation, FeatureTensor, unpack
from tests.faults.harness import Publisher, wait_until

pytestmark = pytest.mark.services

N_MESSAGES = 5200
PER_EXAMPLE = 8  # messages per Hypothesis example (its per-example overhead dominates otherwise)
BASE_ID = 0x0123_4567_0000_0000  # forged frame ids: several non-zero high bytes, so that no single byte
# flip of a forged message can name a frame of the valid batch (ids < FORBIDDEN)
FORBIDDEN = 100_000
VALID = range(120)
RSS_GROWTH_LIMIT_KB = 200 * 1024

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)
INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
HASHABLE_JUNK = st.one_of(st.none(), st.booleans(), INTS, st.floats(), TEXT, st.binary(max_size=64))
JUNK = st.one_of(HASHABLE_JUNK, st.lists(st.integers(-300, 300), max_size=5),
                 st.dictionaries(TEXT, INTS, max_size=3),
                 st.dictionaries(st.integers(0, 9), INTS, min_size=1, max_size=2))


def not_a_valid_id(v) -> bool:
    """False for an int naming a frame of the valid batch (a Hypothesis filter)."""
    return not (type(v) is int and 0 <= v < FORBIDDEN)


VERSIONS = [float(WIRE_VERSION), True, False, WIRE_VERSION - 1, WIRE_VERSION + 1, 0, -1, str(WIRE_VERSION), b"\x02", None,
            2**64 - 1, [WIRE_VERSION], {"v": WIRE_VERSION}]
HUGE_IDS = [MAX_FRAME_ID, MAX_FRAME_ID + 1, 2**64 - 1, -(2**63), -1]
KINDS = ["random", "flip", "truncate", "field", "feature_field", "version", "drop", "extra", "huge_id", "topic",
         "shed", "valid"]


def base_map(site: str, frame_id: int, camera: int, dtype: str) -> dict:
    g = torch.Generator().manual_seed(frame_id % 10_007 * 8 + camera)
    obs = CameraObservation(site, frame_id, camera, time.time(), 2, 0.4,
                            FeatureTensor.quantize(torch.randn(4, 8, 8, generator=g), dtype), 1)
    return unpack(obs.encode())  # the named map (sent as the compact array; both are accepted)


def pack(m: dict) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


@st.composite
def fuzz_message(draw, site: str, unhashable_dtype: bool):
    """(topic, payload): one random or mutated message for the aggregator's subscriptions."""
    cam = draw(st.integers(0, 5))
    frame_id = BASE_ID + draw(st.integers(0, 600))
    m = base_map(site, frame_id, cam, draw(st.sampled_from(["int8", "float16", "float32"])))
    topic = names.obs_topic(site, cam)
    kind = draw(st.sampled_from(KINDS))
    if kind == "random":
        return topic, draw(st.binary(max_size=1024))
    if kind in ("flip", "truncate"):
        raw = bytearray(pack(m))
        if kind == "truncate":
            return topic, bytes(raw[:draw(st.integers(0, len(raw) - 1))])
        for i, b in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)):
            raw[i % len(raw)] = b
        return topic, bytes(raw)
    if kind == "field":
        key = draw(st.sampled_from(sorted(m)))
        m[key] = draw(JUNK.filter(not_a_valid_id) if key == "frame_id" else JUNK)
    elif kind == "feature_field":
        key = draw(st.sampled_from(["dtype", "shape", "data", "scale"]))
        m["features"][key] = draw(HASHABLE_JUNK if key == "dtype" and not unhashable_dtype else JUNK)
    elif kind == "version":
        m["v"] = draw(st.sampled_from(VERSIONS))
    elif kind == "drop":
        del m[draw(st.sampled_from(sorted(m)))]
    elif kind == "extra":
        m[draw(TEXT)] = draw(JUNK)
    elif kind == "huge_id":
        m["frame_id"] = draw(st.sampled_from(HUGE_IDS))
    elif kind == "topic":
        topic = draw(st.sampled_from([names.obs_topic(site, (cam + 1) % 6), f"ada/{site}/cam/x/obs",
                                      f"ada/{site}/cam/99/obs", f"ada/{site}/cam/{cam}/shed"]))
    elif kind == "shed":
        ids = tuple(BASE_ID + i for i in draw(st.lists(st.integers(0, 600), min_size=1, max_size=5)))
        notice = unpack(ShedNotice(site, cam, ids, "behind", time.time()).encode())
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(notice)))
            notice[key] = draw(JUNK.filter(not_a_valid_id))
        return names.shed_topic(site, cam), pack(notice)
    return topic, pack(m)


def heartbeat_observations(h, edge) -> int:
    try:
        beat = edge.heartbeat(h.admin(), h.site, "edge")
    except Exception:  # noqa: BLE001 - Redis answers later
        return 0
    return beat["observations"] if beat else 0


def offline_reference(setup, frames: range, decisions: dict):
    """Offline evaluation of `frames` with the cameras each decision had (int8 wire codec)."""
    _, model, data, t1, t2 = setup
    split = data.test.slice(frames.start, frames.stop)
    present = torch.zeros(len(frames), model.cfg.num_cameras, dtype=torch.bool)
    for i, f in enumerate(frames):
        present[i, list(decisions[f].present)] = True
    cams = evaluation.camera_pass(model, split, batch_size=64, wire_dtype="int8")
    c = evaluation.fuse_pass(model, cams, present, batch_size=64)
    return decide(t1, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred, c.present)


@pytest.mark.parametrize("unhashable_dtype", [pytest.param(True, id="all-mutations")])
def test_fuzzed_messages_then_valid_frames_equal_offline(harness, stream_setup, unhashable_dtype):
    h = harness.start_brokers(appendonly=True)
    edge, cloud = h.edge(wait=False), h.cloud(wait=False)
    edge.wait_log(r"edge \S+: site .* subscribed")
    cloud.wait_log(r"cloud \S+: site .* group")
    rss = {"start": edge.rss_kb()}
    pub = Publisher(h.mqtt.url)
    counts = {"published": 0}

    @settings(max_examples=N_MESSAGES // PER_EXAMPLE, database=None, deadline=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(fuzz_message(h.site, unhashable_dtype), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def publish_batch(messages):
        if not edge.alive:  # stop feeding a dead process: fail now, naming why
            raise AssertionError(f"after {counts['published']} fuzzed messages: {edge.died()}")
        for message in messages:
            pub.publish(*message)
        counts["published"] += len(messages)

    t0 = time.monotonic()
    try:
        publish_batch()
    finally:
        sent = pub.close()
    print(f"hypothesis published {sent} messages in {time.monotonic() - t0:.1f} s")
    wait_until(lambda: heartbeat_observations(h, edge) >= sent, 60, f"the edge to take all {sent} messages",
               interval_s=0.2, abort=h.dead_roles)
    rss["after_fuzz"] = edge.rss_kb()
    assert sent >= 5000
    # The valid batch must be untouched by the fuzz (no forged message named one of its frames).
    r = h.admin()
    touched = [f for f in VALID if r.exists(names.frame_key(h.site, f), names.decided_key(h.site, f))]
    assert not touched and not h.collector.decided_frames(VALID), f"the fuzz reached valid frames {touched[:10]}"
    cams = h.cameras(VALID.start, VALID.stop, 40)
    h.wait_settled(VALID, timeout_s=60)
    rss["after_valid"] = edge.rss_kb()
    acc = h.account(VALID, "valid frames after the fuzz")
    counters = acc.counters
    print(f"edge VmRSS kB: {rss}; dead letters {acc.dead_letters}; forged frames decided {acc.outside}; "
          f"counters {counters}")
    acc.assert_clean()
    assert acc.decided == len(VALID)
    first = {}
    for d in h.collector.decisions():
        first.setdefault(d.frame_id, d)
    ref = offline_reference(stream_setup, VALID, first)
    mismatched = [f for i, f in enumerate(VALID)
                  if first[f].exit != EXIT_NAMES[int(ref.exit[i])] or first[f].prediction != int(ref.prediction[i])]
    print(f"decisions equal to offline: {len(VALID) - len(mismatched)}/{len(VALID)}; mismatched {mismatched[:10]}")
    assert not mismatched
    assert rss["after_valid"] - rss["start"] < RSS_GROWTH_LIMIT_KB, f"edge memory grew: {rss}"
    h.finish([edge, cloud], [cams])
