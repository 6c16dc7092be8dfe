"""Packed low-bit feature codes (int4, int2, int1) and the lazy-upload messages (summary, feature
request, features): the codec is one function for a frame and for a batch, bit for bit, and
decoding refuses anything a sender of ours would not produce."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.wire.messages import (
    DTYPES,
    CameraFeatures,
    CameraObservation,
    CameraSummary,
    FeatureRequest,
    FeatureTensor,
    MessageError,
    decode_one_of,
    feature_nbytes,
    quantize_roundtrip,
    summary_of,
)
from tests.helpers import over_the_wire

LOW = ("int4", "int2", "int1")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype_matches_the_wire_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = torch.randn(7, 12, 8, 8) * torch.rand(7, 12, 1, 1) * 10 + 0.3
    x[3, 4] = 0
    x[5, 1] = 1e-30  # a channel far below float16's range
    batch = quantize_roundtrip(x, dtype)
    for i in range(7):
        f = FeatureTensor.quantize(x[i], dtype)
        back = over_the_wire(f)
        assert back == f and f.nbytes == feature_nbytes((12, 8, 8), dtype)
        assert torch.equal(back.to_tensor(), batch[i])
    assert float(batch[3, 4].abs().max()) < 1e-4  # a zero channel stays (almost) zero


def test_sizes_fall_with_the_bits():
    sizes = {d: feature_nbytes((12, 8, 8), d) for d in DTYPES}
    assert sizes == {"float32": 3072, "float16": 1536, "int8": 768 + 48, "int4": 384 + 24, "int2": 192 + 24,
                     "int1": 96 + 24}


def test_int1_is_sign_times_mean_abs_and_int2_has_four_levels():
    x = torch.tensor([[[-3.0, -1.0], [0.0, 2.0]]])  # one channel
    one = quantize_roundtrip(x[None], "int1")[0]
    m = float(torch.tensor(1.5, dtype=torch.float16))  # mean |x|, as a float16 scale travels
    assert torch.equal(one, torch.tensor([[[-m, -m], [m, m]]]))
    two = quantize_roundtrip(torch.randn(1, 3, 16, 16), "int2")
    for ch in two[0]:
        assert len(ch.unique()) <= 4


def test_straight_through_gradient():
    x = torch.randn(2, 12, 8, 8, requires_grad=True)
    for dtype in LOW:
        y = quantize_roundtrip(x, dtype, ste=True)
        assert torch.equal(y.detach(), quantize_roundtrip(x.detach(), dtype))
        (grad,) = torch.autograd.grad((y * 3).sum(), x)
        assert torch.equal(grad, torch.full_like(x, 3.0))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
              elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(LOW))
def test_low_bit_codec_property(x, dtype):
    """Any finite features survive: odd element counts (padding bits), denormals, constants."""
    t = torch.from_numpy(x)
    f = FeatureTensor.quantize(t, dtype)
    back = over_the_wire(f)
    assert back == f
    got = back.to_tensor()
    assert got.shape == t.shape and bool(torch.isfinite(got).all())
    assert torch.equal(got, quantize_roundtrip(t[None], dtype)[0])


def _bad(dtype):
    good = FeatureTensor.quantize(torch.randn(3, 3, 3), dtype).to_wire()  # 27 codes: padding bits at the end
    yield "short data", {**good, "data": good["data"][:-1]}
    yield "long data", {**good, "data": good["data"] + b"\0"}
    yield "float32 scales", {**good, "scale": np.ones(3, "<f4").tobytes()}
    yield "zero scale", {**good, "scale": np.zeros(3, "<f2").tobytes()}
    yield "inf scale", {**good, "scale": np.full(3, np.inf, "<f2").tobytes()}
    yield "no scale", {**good, "scale": None}
    last = good["data"][-1] | 0x80  # the top bit of the last byte is padding for 27 codes of 4, 2 or 1 bits
    yield "padding bits", {**good, "data": good["data"][:-1] + bytes([last])}
    if dtype == "int4":
        yield "code -8", {**good, "data": b"\x00" + good["data"][1:]}


@pytest.mark.parametrize("case", [(d, *c) for d in LOW for c in _bad(d)], ids=lambda c: f"{c[0]}-{c[1]}")
def test_low_bit_decode_rejects(case):
    _, _, wire = case
    with pytest.raises(MessageError):
        FeatureTensor.from_wire(wire)


def test_lazy_messages_round_trip_and_dispatch():
    f = FeatureTensor.quantize(torch.randn(12, 8, 8), "int1")
    obs = CameraObservation("s", 9, 2, 1.5e9, 3, 0.25, f, 7)
    s = summary_of(obs)
    assert s == CameraSummary("s", 9, 2, 1.5e9, 3, 0.25, 7)
    for m in (s, FeatureRequest("s", 9, (0, 2, 5)), CameraFeatures("s", 9, 2, f)):
        assert type(m).decode(m.encode()) == m
        assert decode_one_of(m.encode(), CameraObservation, CameraSummary, CameraFeatures, FeatureRequest) == m
    assert len(s.encode()) < 100  # a tenth of an int8 observation
    with pytest.raises(MessageError):
        decode_one_of(s.encode(), CameraObservation, CameraFeatures)
    with pytest.raises(MessageError):
        summary_of(CameraObservation("s", 9, 2, 1.5e9, None, None, f))  # a DDNN camera has nothing to summarise


@pytest.mark.parametrize("bad", [
    lambda: CameraSummary("s", 1, 0, 1.0, 3, math.nan),
    lambda: CameraSummary("s", 1, 0, 1.0, None, 0.5),  # a summary always has a verdict
    lambda: CameraSummary("s", -1, 0, 1.0, 3, 0.5),
    lambda: FeatureRequest("s", 1, ()),  # names at least one camera
    lambda: FeatureRequest("s", 1, (2, 1)),
    lambda: FeatureRequest("a/b", 1, (1,)),
    lambda: CameraFeatures("s", 1, 0, b"features"),
])
def test_lazy_messages_refuse_bad_fields(bad):
    with pytest.raises(MessageError):
        bad()


def test_a_feature_request_names_its_cameras_by_a_bitmask_and_takes_a_list_too():
    import msgpack

    req = FeatureRequest("s", 9, (0, 1, 2, 3, 4, 5))
    raw = req.encode()
    assert msgpack.unpackb(raw)[-1] == 0b111111  # one byte where the list takes seven
    assert len(raw) == len(msgpack.packb([2, "freq", "s", 9, [0, 1, 2, 3, 4, 5]])) - 6
    assert FeatureRequest.decode(raw) == req
    # the list is still read (edges older than the bitmask send it), and used for ids of 64 and up
    assert FeatureRequest.decode(msgpack.packb([2, "freq", "s", 9, [0, 3]])).cameras == (0, 3)
    far = FeatureRequest("s", 9, (1, 64))
    assert msgpack.unpackb(far.encode())[-1] == [1, 64] and FeatureRequest.decode(far.encode()) == far
    for bad in (0, -1, True, 2.0):
        with pytest.raises(MessageError):
            FeatureRequest.decode(msgpack.packb([2, "freq", "s", 9, bad]))
