import math
import pickle

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.wire import names
from pipeline.wire.messages import (
    MAX_MESSAGE_BYTES,
    WIRE_VERSION,
    CameraObservation,
    CameraStatus,
    CameraSummary,
    Decision,
    Escalation,
    FeatureTensor,
    MessageError,
    observation_bytes,
    quantize_roundtrip,
    unpack,
)
from tests.helpers import over_the_wire, pack


def obs(features=None, **changes):
    base = dict(site="s1", frame_id=7, camera=2, captured_at=1.7e9, prediction=3, entropy=0.25,
                features=features or FeatureTensor.quantize(torch.randn(12, 8, 8)), label=4)
    base.update(changes)
    return CameraObservation(**base)


def wire(message) -> dict:
    """The message's named map (what `unpack` makes of the compact array it is sent as)."""
    return unpack(message.encode())


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
def test_observation_round_trip(dtype):
    x = torch.randn(12, 8, 8)
    o = obs(FeatureTensor.quantize(x, dtype))
    back = CameraObservation.decode(o.encode())
    assert back == o
    got = back.features.to_tensor()
    assert got.dtype == torch.float32 and got.shape == (12, 8, 8)
    tol = {"int8": x.abs().amax(dim=(1, 2)).max() / 127 / 2 + 1e-7, "float16": 1e-2, "float32": 0.0}[dtype]
    assert float((got - x).abs().max()) <= tol


def test_int8_is_per_channel_with_unit_scale_for_zero_channels():
    x = torch.randn(4, 8, 8)
    x[1] = 0
    x[2] *= 100
    f = FeatureTensor.quantize(x)
    scale = np.frombuffer(f.scale, dtype="<f4")
    assert scale[1] == 1.0
    assert np.allclose(scale[[0, 2, 3]], x.abs().amax(dim=(1, 2)).numpy()[[0, 2, 3]] / 127)
    assert f.nbytes == 4 * 64 + 4 * 4
    assert torch.equal(f.to_tensor()[1], torch.zeros(8, 8))


def test_int8_observation_is_small():
    # 12 x 8 x 8 int8 + 12 scales + fields: under 1 KiB, a third of the raw 32 x 32 x 3 view
    assert observation_bytes(torch.randn(12, 8, 8)) < 1024


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
def test_quantize_roundtrip_matches_the_wire_bit_for_bit(dtype):
    x = torch.randn(5, 12, 8, 8) * torch.rand(5, 12, 1, 1) * 10
    x[3, 4] = 0
    batch = quantize_roundtrip(x, dtype)
    for i in range(5):
        assert torch.equal(batch[i], FeatureTensor.quantize(x[i], dtype).to_tensor())
    if dtype == "float32":
        assert torch.equal(batch, x)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
              elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(["int8", "float16", "float32"]))
def test_codec_property(x, dtype):
    """Any finite features survive the wire (denormal magnitudes such as 3e-45 included)."""
    t = torch.from_numpy(x)
    f = FeatureTensor.quantize(t, dtype)
    back = over_the_wire(f)
    assert back == f
    got = back.to_tensor()
    assert got.shape == t.shape and bool(torch.isfinite(got).all())
    if dtype == "int8":  # error at most half a step of the channel's scale
        step = t.abs().reshape(t.shape[0], -1).amax(1).clamp_min(1e-30) / 127
        assert bool(((got - t).abs() <= step[:, None, None] * 0.5001 + 1e-30).all())
        assert torch.equal(got, quantize_roundtrip(t[None], "int8")[0])
    elif dtype == "float32":
        assert torch.equal(got, t)


@settings(max_examples=40, deadline=None)
@given(frame_id=st.integers(0, 2**63 - 1), camera=st.integers(0, 255), at=st.floats(0, 4e9),
       pred=st.none() | st.integers(0, 9), ent=st.floats(0, 1), label=st.none() | st.integers(0, 65535),
       site=st.from_regex(names.SITE_RE, fullmatch=True))
def test_observation_property(frame_id, camera, at, pred, ent, label, site):
    o = CameraObservation(site, frame_id, camera, at, pred, None if pred is None else ent,
                          FeatureTensor.quantize(torch.ones(2, 2, 2)), label)
    assert CameraObservation.decode(o.encode()) == o


def test_every_message_round_trips():
    f = FeatureTensor.quantize(torch.randn(72, 8, 8))
    for m in (Escalation("s", 1, (0, 2, 5), 1.0, f, 0.5, 3, None),
              Decision("s", 1, "exit1", 3, 0.1, 2, (0, 1, 2), 1.0, 2.0, "edge-1", 4),
              Decision("s", 2, "cloud", 3, None, None, (), 1.0, 2.0),
              CameraStatus("s", 3, "offline", 0.0)):
        assert type(m).decode(m.encode()) == m
    assert Decision("s", 1, "exit2", 3, 0.1, None, (0,), 1.0, 1.25).latency_ms == 250.0


def _bad_obs_maps():
    good = wire(obs())
    yield "version", {**good, "v": WIRE_VERSION + 1}
    yield "tag", {**good, "t": "dec"}
    yield "missing field", {k: v for k, v in good.items() if k != "entropy"}
    yield "extra field", {**good, "extra": 1}
    yield "bool as int", {**good, "frame_id": True}
    yield "negative frame", {**good, "frame_id": -1}
    yield "camera range", {**good, "camera": 256}
    yield "entropy above 1", {**good, "entropy": 1.5}
    yield "nan entropy", {**good, "entropy": float("nan")}
    yield "inf time", {**good, "captured_at": math.inf}
    yield "prediction without entropy", {**good, "entropy": None}
    yield "site with slash", {**good, "site": "a/b"}
    yield "site wildcard", {**good, "site": "#"}
    yield "site type", {**good, "site": 5}
    feats = good["features"]
    yield "dtype", {**good, "features": {**feats, "dtype": "float64"}}
    yield "short data", {**good, "features": {**feats, "data": feats["data"][:-1]}}
    yield "shape mismatch", {**good, "features": {**feats, "shape": [12, 8, 9]}}
    yield "too many dims", {**good, "features": {**feats, "shape": [1, 12, 8, 8, 1]}}
    yield "zero dim", {**good, "features": {**feats, "shape": [0, 8, 8]}}
    yield "huge shape", {**good, "features": {**feats, "shape": [1 << 20, 1, 1], "data": b""}}
    yield "no scale", {**good, "features": {**feats, "scale": None}}
    yield "short scale", {**good, "features": {**feats, "scale": feats["scale"][:-4]}}
    yield "negative scale", {**good, "features": {**feats, "scale": np.full(12, -1, "<f4").tobytes()}}
    yield "nan scale", {**good, "features": {**feats, "scale": np.full(12, np.nan, "<f4").tobytes()}}
    yield "code -128", {**good, "features": {**feats, "data": b"\x80" * 768}}
    yield "features not a map", {**good, "features": [1, 2]}
    yield "data as str", {**good, "features": {**feats, "data": "x" * 768}}
    f32 = FeatureTensor.quantize(torch.ones(2, 2, 2), "float32").to_wire()
    yield "nan float32", {**good, "features": {**f32, "data": np.full(8, np.nan, "<f4").tobytes()}}
    yield "inf float16", {**good, "features": {**f32, "dtype": "float16", "data": np.full(8, np.inf, "<f2").tobytes()}}
    yield "scale on float", {**good, "features": {**f32, "scale": b"\0\0\x80?" * 2}}


@pytest.mark.parametrize("case", list(_bad_obs_maps()), ids=lambda c: c[0])
def test_decode_rejects(case):
    with pytest.raises(MessageError):
        CameraObservation.decode(pack(case[1]))


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", b"\x92\x01\x02", pack([1, 2]), pack({1: 2}), pack("text"),
    pickle.dumps({"v": 1, "t": "obs"}),  # no pickle on the wire
    msgpack.packb({"v": 1, "t": "obs", "x": msgpack.ExtType(5, b"abc")}),
    b"\x81\xa1v" + b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
    b"\x00" * (MAX_MESSAGE_BYTES + 1),
])
def test_decode_rejects_garbage(raw):
    with pytest.raises(MessageError):
        CameraObservation.decode(raw)
    with pytest.raises(MessageError):
        unpack(raw)


def test_decode_rejects_non_bytes():
    with pytest.raises(MessageError):
        CameraObservation.decode("text")  # type: ignore[arg-type]


def test_encode_refuses_what_it_cannot_send():
    with pytest.raises(MessageError):
        FeatureTensor.quantize(torch.tensor([[[float("nan")]]]))
    with pytest.raises(MessageError):
        FeatureTensor.quantize(torch.full((1, 1, 1), 1e6), "float16")  # overflows to inf
    with pytest.raises(MessageError):
        FeatureTensor.quantize(torch.ones(1, 1, 1), "bfloat16")
    with pytest.raises(MessageError):
        Decision("s", 1, "exit1", 3, 0.1, None, (0,), 1.0, 2.0)  # exit 1 names its camera
    with pytest.raises(MessageError):
        Decision("s", 1, "exit2", 3, 0.1, None, (2, 1), 1.0, 2.0)  # present must be sorted
    with pytest.raises(MessageError):
        CameraStatus("s", 0, "sleeping", 0.0)


def test_message_error_is_a_value_error():
    assert issubclass(MessageError, ValueError)


def test_names_live_in_the_names_module():
    assert names.obs_topic("s", 3) == "ada/s/cam/3/obs"
    assert names.status_topic("s", 3) == "ada/s/cam/3/status"
    assert names.results_topic("s") == "ada/s/results"
    assert names.shared_obs_filter("s") == "$share/edge/ada/s/cam/+/obs"
    assert names.frame_key("s", 9) == "ada:{s}:frame:9"
    assert names.escalations_stream("s") == "ada:{s}:escalations"
    assert names.results_stream("s") == "ada:{s}:results"
    assert names.deadletter_stream("s") == "ada:{s}:deadletter"
    for bad in ("", "a/b", "a+b", "a:b", "#", "x" * 65):
        with pytest.raises(ValueError):
            names.obs_topic(bad, 0)


def test_every_key_of_a_site_is_in_the_site_s_cluster_slot():
    from redis.crc import key_slot

    keys = [names.per_frame_key("site-7", kind, 123) for kind in names.FRAME_KINDS] + [
        f("site-7") for f in (names.claimed_key, names.pending_key, names.escalations_stream, names.results_stream,
                              names.deadletter_stream, names.losses_stream, names.front_key, names.counters_key,
                              names.gaps_key)]
    keys.append(names.heartbeat_key("site-7", "edge", "edge-1"))
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"site-7")}
    assert all(k.startswith("ada:{site-7}:") for k in keys)


def test_no_lua_script_builds_a_key():
    """A key built inside a script escapes the cluster's slot check: every key comes in KEYS."""
    from edge import frame_store
    from pipeline.transport import results_sink

    scripts = [getattr(frame_store, n) for n in frame_store.__all__ if n.isupper()] + [results_sink.RECORD_RESULT]
    for script in scripts:
        assert ".." not in script and "ada:" not in script, script


@pytest.mark.parametrize("version", [float(WIRE_VERSION), True, str(WIRE_VERSION), None, WIRE_VERSION - 1, WIRE_VERSION + 1])
def test_the_version_must_be_the_integer_itself(version):
    m = wire(obs())
    m["v"] = version
    with pytest.raises(MessageError, match="wire version"):
        CameraObservation.decode(pack(m))


def test_features_beyond_float16_range_are_refused_at_the_door():
    import numpy as np

    m = wire(obs(FeatureTensor.quantize(torch.randn(12, 8, 8), "float32")))
    values = np.frombuffer(m["features"]["data"], dtype="<f4").copy()
    values[5] = 3e38  # finite, but overflows the edge block into NaN
    m["features"]["data"] = values.tobytes()
    with pytest.raises(MessageError, match="magnitude"):
        CameraObservation.decode(pack(m))
    q = wire(obs())
    q["features"]["scale"] = np.full(12, 3e38, dtype="<f4").tobytes()
    with pytest.raises(MessageError, match="scales"):
        CameraObservation.decode(pack(q))
    with pytest.raises(MessageError, match="magnitude"):
        FeatureTensor.quantize(torch.full((12, 8, 8), 1e6), "float32")


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2", "int1"])
def test_every_int_code_decodes_within_the_feature_bound(dtype):
    # Features at the bound encode to scales a receiver accepts and decode within the bound (up to
    # the scale's rounding); a larger scale is refused: int2's codes reach 1.5 steps, so a scale of
    # 65,504 would decode to 98,256, past what float16 holds.
    import numpy as np

    from pipeline.wire.messages import _SCALE, MAX_FEATURE_ABS, SCALE_ROUNDING

    x = torch.full((12, 8, 8), MAX_FEATURE_ABS)
    x[:, 0] = -MAX_FEATURE_ABS
    ft = FeatureTensor.quantize(x, dtype)
    assert float(ft.to_tensor().abs().max()) <= MAX_FEATURE_ABS * SCALE_ROUNDING
    levels = {"int8": 127, "int4": 7, "int2": 1.5, "int1": 1}[dtype]
    over = np.full(12, min(65504.0, 1.01 * MAX_FEATURE_ABS / levels), dtype=_SCALE[dtype])
    if float(over[0]) * levels > MAX_FEATURE_ABS * SCALE_ROUNDING:
        with pytest.raises(MessageError, match="scales"):
            FeatureTensor(ft.data, dtype, ft.shape, over.tobytes())
    if dtype == "int2":
        with pytest.raises(MessageError, match="scales"):
            FeatureTensor(ft.data, dtype, ft.shape, np.full(12, 65504, dtype="<f2").tobytes())


@pytest.mark.parametrize("dtype", [["int8"], {"x": 1}, 8, None])
def test_a_features_dtype_of_the_wrong_type_is_a_message_error(dtype):
    m = wire(obs())
    m["features"]["dtype"] = dtype
    with pytest.raises(MessageError):
        CameraObservation.decode(pack(m))


def test_int8_of_denormal_features_is_accepted():
    """max|x| / 127 underflows for a channel of denormals: it must not become a scale of 0 that
    the receiver refuses (found by hypothesis: 3e-45)."""
    t = torch.tensor([[[3e-45, -1e-40]], [[1.0, 0.5]]], dtype=torch.float32)
    f = FeatureTensor.quantize(t, "int8")
    back = over_the_wire(f)
    got = back.to_tensor()
    assert bool((got[0] == 0).all()) and torch.allclose(got[1], t[1], atol=1 / 254)
    assert torch.equal(got, quantize_roundtrip(t[None], "int8")[0])


def test_messages_travel_as_the_compact_array_and_the_named_map_is_accepted_too():
    o = obs(FeatureTensor.quantize(torch.randn(12, 8, 8), "int2"))
    raw = o.encode()
    arr = msgpack.unpackb(raw, raw=False)
    assert arr[:2] == [WIRE_VERSION, "obs"] and len(arr) == 2 + len(CameraObservation.FIELDS)
    assert arr[2 + CameraObservation.FIELDS.index("features")] == o.features.to_compact()
    named = pack(o._wire())
    assert CameraObservation.decode(raw) == CameraObservation.decode(named) == o
    # the field names are what the compact form saves: every name once, the features' four too
    saved = sum(len(n) + 1 for n in ("v", "t", *CameraObservation.FIELDS, *FeatureTensor.WIRE_FIELDS))
    assert len(named) - len(raw) >= saved


def test_every_message_class_round_trips_in_both_forms():
    from pipeline.wire.control import ShedNotice
    from pipeline.wire.messages import CameraFeatures, CameraSummary, FeatureRequest

    f = FeatureTensor.quantize(torch.randn(12, 8, 8), "int1")
    for m in (CameraSummary("s", 5, 1, 1.0, 3, 0.5, None), FeatureRequest("s", 5, (0, 3)),
              CameraFeatures("s", 5, 1, f), Escalation("s", 1, (0, 2), 1.0, f, 0.5, 3, 7),
              CameraStatus("s", 3, "online", 2.0), ShedNotice("s", 3, (5,), "behind", 1.0)):
        assert type(m).decode(m.encode()) == m
        assert type(m).decode(pack(m._wire())) == m


@pytest.mark.parametrize("case", [
    ("empty array", []),
    ("version only", [WIRE_VERSION]),
    ("wrong version", [WIRE_VERSION + 1, "obs"]),
    ("unknown tag", [WIRE_VERSION, "nope", 1, 2]),
    ("tag not text", [WIRE_VERSION, 7, 1]),
    ("one field short", None),
    ("one field extra", None),
    ("features array of three", None),
], ids=lambda c: c[0])
def test_malformed_compact_arrays_are_refused(case):
    name, arr = case
    good = msgpack.unpackb(obs().encode(), raw=False)
    feat = 2 + CameraObservation.FIELDS.index("features")
    if name == "one field short":
        arr = good[:-1]
    elif name == "one field extra":
        arr = [*good, 0]
    elif name == "features array of three":
        arr = [*good[:feat], good[feat][:3], *good[feat + 1:]]
    with pytest.raises(MessageError):
        CameraObservation.decode(pack(arr))


def test_a_camera_entropy_travels_as_float32_exactly():
    from pipeline.wire.messages import CameraSummary

    ent = torch.tensor([0.123456789], dtype=torch.float32)  # as a camera computes it
    s = CameraSummary("s1", 7, 2, 1.7e9, 3, float(ent[0]))
    raw = s.encode()
    assert b"\xca" + ent.numpy().astype(">f4").tobytes() in raw  # msgpack float32
    assert msgpack.packb(float(ent[0])) not in raw  # not its float64
    back = CameraSummary.decode(raw)
    assert back.entropy == float(ent[0]) and back.captured_at == 1.7e9  # captured_at stays float64
    # 4 bytes fewer than the float64 form; a value given in float64 is held (and sent) rounded to float32
    assert len(raw) == len(msgpack.packb([WIRE_VERSION, "sum", "s1", 7, 2, 1.7e9, 3, float(ent[0]), None])) - 4
    assert CameraSummary("s1", 7, 2, 1.7e9, 3, 0.1).entropy == float(torch.tensor(0.1, dtype=torch.float32))
    o = obs(FeatureTensor.quantize(torch.randn(12, 8, 8), "int2"))
    assert CameraObservation.decode(o.encode()) == o


@pytest.mark.parametrize("captured_at", [1e300, 4.2e9, -1.0])
def test_a_capture_time_no_clock_gives_is_refused(captured_at):
    # 1e300 as a frame's capture time put latencies of -1e300 s into the metrics; a real clock,
    # even a wrong one, stays between 1970 and 2100.
    with pytest.raises(MessageError, match="captured_at must be finite and in"):
        obs(captured_at=captured_at)
    assert obs(captured_at=0.0).captured_at == 0.0 and obs(captured_at=4.1e9).captured_at == 4.1e9


def test_a_negative_zero_entropy_is_zero():
    back = CameraObservation.decode(obs(entropy=-0.0).encode())
    assert math.copysign(1.0, back.entropy) == 1.0


@pytest.mark.parametrize("bad", ["s1\n", "s 1", "", "a/b", "x" * 65])
def test_a_site_id_is_the_whole_string(bad):
    """`$` would also match before a final newline: "s1\n" is no site id, on the wire or off it."""
    with pytest.raises(ValueError, match="site id"):
        names.check_site(bad)
    with pytest.raises(MessageError):
        CameraSummary(bad, 0, 0, 1.0, 3, 0.5, None)


@pytest.mark.parametrize("bad", ["e1\n", "a/b", "", "x" * 129, "a b"])
def test_a_service_id_is_the_whole_string(bad):
    with pytest.raises(ValueError, match="service id"):
        names.check_service_id(bad)
    assert not names.SERVICE_RE.match(bad)
