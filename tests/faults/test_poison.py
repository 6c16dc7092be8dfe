"""Poisoned input at running roles: observations no camera of ours would send, at the edge; and
garbage entries in the escalation stream, at the cloud. Nothing may kill a role; every rejected
message lands in the dead letters with its reason; valid traffic around it is decided as usual."""

from __future__ import annotations

import os
import random
import time

import msgpack
import numpy as np
import pytest
import torch

from pipeline.layers import forward_rows
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, Escalation, FeatureTensor, unpack
from tests.faults.harness import publish_raw, wait_until

pytestmark = pytest.mark.services

FPS = 30


def wire_map(site: str, frame_id: int, camera: int, shape=(4, 8, 8)) -> dict:
    """A valid observation, encoded by the product's encoder, as the msgpack map it travels as."""
    g = torch.Generator().manual_seed(frame_id * 8 + camera)
    obs = CameraObservation(site, frame_id, camera, time.time(), 1, 0.5,
                            FeatureTensor.quantize(torch.randn(*shape, generator=g), "int8"), 3)
    return unpack(obs.encode())  # the named map (sent as the compact array; both are accepted)


def pack(m: dict) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def float32_poison(site: str, frame_id: int, camera: int, value: float = 3e38) -> bytes:
    """float32 features of `value` everywhere: the encoder refuses them, so they are built by hand."""
    m = wire_map(site, frame_id, camera)
    m["features"] = {"dtype": "float32", "shape": [4, 8, 8], "data": np.full(256, value, "<f4").tobytes(),
                     "scale": None}
    return pack(m)


def int8_scale_poison(site: str, frame_id: int, camera: int, scale: float = 3e38) -> bytes:
    m = wire_map(site, frame_id, camera)
    m["features"] = {"dtype": "int8", "shape": [4, 8, 8], "data": np.full(256, 127, "i1").tobytes(),
                     "scale": np.full(4, scale, "<f4").tobytes()}
    return pack(m)


def float16_extreme(site: str, frame_id: int, camera: int) -> bytes:
    """Features at the largest magnitude the wire admits (65504, float16's largest finite value)."""
    m = wire_map(site, frame_id, camera)
    m["features"] = {"dtype": "float16", "shape": [4, 8, 8],
                     "data": np.where(np.arange(256) % 2 == 0, 65504.0, -65504.0).astype("<f2").tobytes(),
                     "scale": None}
    return pack(m)


def dead_letters(h) -> list[dict]:
    with h.collector.cond:
        return list(h.collector.dead.values())


def test_poisoned_observations_at_a_running_edge(harness):
    h = harness.start_brokers(appendonly=True)
    edge, cloud = h.edge(wait=False), h.cloud(wait=False)
    edge.wait_log(r"edge \S+: site .* subscribed")
    cloud.wait_log(r"cloud \S+: site .* group")
    site, rng = h.site, random.Random(7)

    def topic(k: int) -> str:
        return names.obs_topic(site, k)

    poison = {"float32 3e38": [(topic(k), float32_poison(site, 100_000, k)) for k in range(6)],
              "int8 scale 3e38": [(topic(k), int8_scale_poison(site, 100_001, k)) for k in range(6)],
              "garbage bytes": [(topic(rng.randrange(6)), os.urandom(rng.randrange(1, 2000))) for _ in range(20)],
              "empty payload": [(topic(0), b"")]}
    extreme = [(topic(k), float16_extreme(site, 100_002, k)) for k in range(6)]  # admitted by the wire
    sent = publish_raw(h.mqtt.url, [m for batch in poison.values() for m in batch] + extreme)
    n_poison = sum(len(v) for v in poison.values())
    wait_until(lambda: len(dead_letters(h)) >= n_poison, 30, f"{n_poison} dead letters", abort=h.dead_roles)
    frames = range(90)
    cams = h.cameras(frames.start, frames.stop, FPS)
    h.wait_settled([*frames, 100_002], timeout_s=60)
    letters = dead_letters(h)
    by_payload = {bytes(f[b"payload"]): f[b"reason"].decode() for f in letters}
    for kind, batch in poison.items():
        for _, payload in batch:
            assert payload[:4096] in by_payload, f"{kind}: not in the dead letters"
            assert by_payload[payload[:4096]].strip(), f"{kind}: dead letter without a reason"
        print(f"{kind}: {len(batch)} dead-lettered, e.g. {by_payload[batch[0][1][:4096]][:120]!r}")
    extreme_fate = ("decided" if 100_002 in h.collector.decided_frames() else
                    "dead-lettered" if any(b"100002" in f[b"source"] + f[b"reason"] for f in letters) else "?")
    print(f"published {sent} poisoned messages; frame 100002 (features at +-65504, admitted by the wire): "
          f"{extreme_fate}")
    acc = h.account(frames, "valid frames after the poison")
    acc.assert_clean()
    assert acc.decided == len(frames)
    assert extreme_fate != "?"
    h.finish([edge, cloud], [cams])


def test_observation_with_an_unhashable_dtype_does_not_kill_the_edge(harness):
    h = harness.start_brokers(appendonly=True)
    edge, cloud = h.edge(wait=False), h.cloud(wait=False)
    edge.wait_log(r"edge \S+: site .* subscribed")
    cloud.wait_log(r"cloud \S+: site .* group")
    m = wire_map(h.site, 100_000, 2)
    m["features"]["dtype"] = ["int8"]  # a msgpack array where a string belongs
    publish_raw(h.mqtt.url, [(names.obs_topic(h.site, 2), pack(m))])
    wait_until(lambda: dead_letters(h) or None, 15, "the observation in the dead letters", abort=h.dead_roles)
    frames = range(30)
    cams = h.cameras(frames.start, frames.stop, FPS)
    h.wait_settled(frames, timeout_s=60)
    h.account(frames, "valid frames after an unhashable dtype").assert_clean()
    h.finish([edge, cloud], [cams])


def valid_escalations(setup, site: str, ids: list[int]) -> tuple[list[Escalation], list[int]]:
    """Escalations of test frames as the edge makes them (cameras -> int8 wire -> fusion -> int8),
    and the cloud's prediction for each (batched, as the cloud runs them)."""
    from edge.fusion import fuse
    from pipeline.offline import evaluation

    _, model, data, _, _ = setup
    split = data.test.head(len(ids))
    cams = evaluation.camera_pass(model, split, batch_size=64, wire_dtype="int8")
    fused = fuse(cams.features, torch.ones(len(ids), model.cfg.num_cameras, dtype=torch.bool), model.cfg.fusion)
    escs = [Escalation(site, f, tuple(range(model.cfg.num_cameras)), time.time(),
                       FeatureTensor.quantize(fused[i], "int8"), 0.9, 0, int(split.labels[i]))
            for i, f in enumerate(ids)]
    with torch.no_grad():
        logits = forward_rows(model.cloud.eval(), torch.stack([e.features.to_tensor() for e in escs]))
    return escs, logits.argmax(-1).tolist()


def xadd_all(r, site: str, entries: list[dict]) -> list[bytes]:
    """XADD every entry in one MULTI, so that the cloud reads them as one batch."""
    with r.pipeline(transaction=True) as p:
        for fields in entries:
            p.xadd(names.escalations_stream(site), fields)
        return p.execute()


def cloud_dead_letter(letters: list[dict], entry_id: bytes) -> dict | None:
    for f in letters:
        if repr(entry_id) in f[b"source"].decode(errors="replace"):
            return f
    return None


def test_garbage_escalations_between_valid_ones(harness, stream_setup):
    h = harness.start_brokers(appendonly=True)
    cloud = h.cloud(wait=True)
    ids = list(range(900_010, 900_016))
    escs, expected = valid_escalations(stream_setup, h.site, ids)
    wrong_shape = Escalation(h.site, 900_003, (0,), time.time(),
                             FeatureTensor(np.full(27, 1e4, "<f4").tobytes(), "float32", (3, 3, 3)), 0.5, 0)
    extreme = Escalation(h.site, 900_004, (0, 1), time.time(),
                         FeatureTensor(np.full(24 * 64, 65504.0, "<f2").tobytes(), "float16", (24, 8, 8)), 0.5, 0)
    garbage = {"not msgpack": {"frame": 900_001, "msg": b"\xc1\xc1 not msgpack"},
               "no msg field": {"frame": 900_002},
               "wrong shape (3x3x3 of 1e4)": {"frame": 900_003, "msg": wrong_shape.encode()},
               "an observation, not an escalation": {"frame": 900_005, "msg": pack(wire_map(h.site, 900_005, 0))}}
    entries = [{"frame": escs[0].frame_id, "msg": escs[0].encode()}]
    for i, fields in enumerate(garbage.values()):
        entries += [fields, {"frame": escs[i + 1].frame_id, "msg": escs[i + 1].encode()}]
    entries += [{"frame": 900_004, "msg": extreme.encode()}, {"frame": escs[5].frame_id, "msg": escs[5].encode()}]
    entry_ids = dict(zip([e["frame"] for e in entries], xadd_all(h.admin(), h.site, entries)))
    h.wait_decided(ids, timeout_s=30, what="valid escalations")
    wait_until(lambda: len(dead_letters(h)) >= len(garbage), 15, "the garbage in the dead letters",
               abort=h.dead_roles)
    r = h.admin()
    wait_until(lambda: r.xlen(names.escalations_stream(h.site)) == 0 or None, 15,
               "every escalation acknowledged and deleted", abort=h.dead_roles)
    letters = dead_letters(h)
    for (kind, fields) in garbage.items():
        f = cloud_dead_letter(letters, entry_ids[fields["frame"]])
        assert f is not None, f"{kind}: not dead-lettered"
        print(f"{kind}: dead-lettered: {f[b'reason'].decode()[:120]!r}")
    decided = {d.frame_id: d for d in h.collector.decisions()}
    got = [decided[f].prediction for f in ids]
    extreme_fate = ("answered" if 900_004 in decided else
                    "dead-lettered" if cloud_dead_letter(letters, entry_ids[900_004]) else "?")
    print(f"valid batch-mates: predictions {got}, offline cloud {expected}; extreme (+65504 float16) escalation: "
          f"{extreme_fate}")
    acc = h.account(ids, "valid escalations among garbage")
    acc.assert_clean()
    assert got == expected
    assert extreme_fate != "?"
    assert int(r.xpending(names.escalations_stream(h.site), names.CLOUD_GROUP)["pending"]) == 0
    h.finish([cloud])


def test_escalation_with_an_unhashable_dtype_does_not_kill_the_cloud(harness, stream_setup):
    h = harness.start_brokers(appendonly=True)
    cloud = h.cloud(wait=True)
    ids = [900_020, 900_021]
    escs, _ = valid_escalations(stream_setup, h.site, ids)
    bad = unpack(escs[0].encode())  # the named map
    bad["frame_id"], bad["features"]["dtype"] = 900_022, {"int8": 1}  # a msgpack map where a string belongs
    xadd_all(h.admin(), h.site, [{"frame": ids[0], "msg": escs[0].encode()}, {"frame": 900_022, "msg": pack(bad)},
                                 {"frame": ids[1], "msg": escs[1].encode()}])
    h.wait_decided(ids, timeout_s=20, what="the valid batch-mates")
    wait_until(lambda: dead_letters(h) or None, 15, "the bad escalation in the dead letters", abort=h.dead_roles)
    h.account(ids, "valid escalations beside an unhashable dtype").assert_clean()
    h.finish([cloud])
