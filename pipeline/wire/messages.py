"""The wire format: versioned msgpack arrays (or maps), one frozen dataclass per message, no pickle anywhere.

    CameraObservation  camera -> edge    (MQTT ada/{site}/cam/{cam}/obs, QoS 1): eager upload, features included
    CameraSummary      camera -> edge    (MQTT ada/{site}/cam/{cam}/obs, QoS 1): lazy upload, prediction + entropy
    FeatureRequest     edge -> cameras   (MQTT ada/{site}/edge/request, QoS 1): lazy, a frame that did not exit 1
    CameraFeatures     camera -> edge    (MQTT ada/{site}/cam/{cam}/feat, QoS 1): lazy, the answer
    CameraStatus       camera -> anyone  (MQTT ada/{site}/cam/{cam}/status, retained; last will)
    Escalation         edge -> cloud     (Redis stream ada:{site}:escalations)
    Decision           edge/cloud -> out (MQTT ada/{site}/results and stream ada:{site}:results)

Every message is sent as a msgpack array [WIRE_VERSION, <type tag>, *fields in the class's
FIELDS order], its features as [dtype, shape, data, scale]: the compact form, which spares each
message its field names (on the camera link, where a summary is a few tens of bytes, they were
most of it). A normalized entropy is computed in float32 and travels as one (5 bytes, not 9:
the value is exact, so the edge decides on the camera's own number), and a feature request names
its cameras by a bitmask (`FeatureRequest`). Receivers also accept the named form, a msgpack map {"v": WIRE_VERSION, "t": <type
tag>, ...fields} with features as {"dtype", "shape", "data", "scale"}; `unpack` turns either
into that map, which every message is validated from. Features travel as a `FeatureTensor`: raw
little-endian bytes with dtype and shape, and for the int dtypes one scale per channel. int8 is the default on the camera link (768 bytes for 12 x 8 x 8
features); int4, int2 and int1 pack 2, 4 and 8 codes a byte (384, 192 and 96 bytes); float16 and
float32 are selectable, and float32 is exact. `quantize_roundtrip` is the same codec on a batch,
for offline evaluation and quantization-aware training (`ste=True`).

Constructing a message validates it, so `decode` (which constructs) checks types, ranges,
shapes, byte sizes against a hard cap and finiteness, and raises `MessageError` for anything
wrong; nothing else escapes `decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np
import torch

from pipeline.config import WIRE_DTYPES
from pipeline.errors import MessageError
from pipeline.wire.names import check_site

WIRE_VERSION = 2  # 2: the compact array form (1 knew only maps)
MAX_MESSAGE_BYTES = 1 << 20  # hard cap on one encoded message (a float32 6 x 12 x 8 x 8 tensor is 18 KiB)
MAX_ELEMENTS = 1 << 18  # hard cap on the elements of one feature tensor
MAX_DIMS = 4  # feature tensors are channel-first, at most K x S x S (plus one spare dim)
MAX_CAMERAS = 256  # camera ids are 0..255
MAX_CLASSES = 1 << 16  # class ids are 0..65535
MAX_FRAME_ID = (1 << 63) - 1
MAX_TIME_S = 4_102_444_800.0  # 2100-01-01 in seconds since the Unix epoch: a time past it is garbage, not a clock
MAX_TEXT = 256  # characters of a free-text field (service ids, reasons)
# Largest feature magnitude on the wire: float16's largest finite value. Camera features are
# batch-normalised (|x| in the tens); anything near float32's range overflows the edge block into
# NaN, so such a message is refused at the door instead of poisoning a frame's computation.
MAX_FEATURE_ABS = 65504.0
# Feature codes on the wire, by dtype: bits per element. float32 is exact and float16 rounds; the
# int dtypes are symmetric codes with one scale per (frame, channel) (float32 for int8, float16
# below 8 bits, where it is a sizeable share of the message), packed little-endian and least
# significant bits first below 8 bits (int4: 2 codes a byte, int2: 4, int1: 8):
#   mid-tread (int8, int4): codes -L..L, scale = max|x| / L, value = code x scale (0 is a level)
#   mid-rise  (int2, int1): codes -2^(b-1)..2^(b-1)-1, step = c x mean|x|, value = (code + 1/2) x step,
#                           so int1 is sign(x) x mean|x| (DDNN's binarized features, with a scale)
# Below 8 bits a code is stored as code + 2^(b-1) (int4's 0 would be -8: refused); int8 as itself.
DTYPES: dict[str, int] = {"float32": 32, "float16": 16, "int8": 8, "int4": 4, "int2": 2, "int1": 1}
assert tuple(DTYPES) == WIRE_DTYPES, "pipeline.config.WIRE_DTYPES lists the wire codes for the model config"
INT8_LEVELS = 127  # symmetric int8: codes in -127..127, scale = max|x| / 127 per channel
MID_TREAD_LEVELS = {"int8": INT8_LEVELS, "int4": 7}
# step = c x mean|x| of the channel: int1's c = 2 puts the two levels at +-mean|x|, the L2-best
# reconstruction of sign codes; int2's 1.25 x mean|x| = 0.996 sigma for a Gaussian channel, the
# MSE-optimal step of a 4-level uniform quantizer.
MID_RISE_STEP = {"int2": 1.25, "int1": 2.0}
EXIT_NAMES = ("exit1", "exit2", "cloud")  # every exit a frame can leave by, in the order of the tiers
SCALE_ROUNDING = 1 + 2 ** -10  # a scale rounds to its wire dtype (float16: 11 bits), so the bound on scales allows that
_TINY = float(torch.finfo(torch.float32).tiny)
_TINY16 = float(torch.finfo(torch.float16).tiny)  # smallest normal float16, 6.1e-5
_SCALE = {"int8": np.dtype("<f4"), "int4": np.dtype("<f2"), "int2": np.dtype("<f2"), "int1": np.dtype("<f2")}
_FLOAT = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def _max_level(dtype: str) -> float:
    """Largest |value| / scale of a dtype's codes."""
    if dtype in MID_TREAD_LEVELS:
        return float(MID_TREAD_LEVELS[dtype])
    return (1 << (DTYPES[dtype] - 1)) - 0.5


def _check_dtype(dtype: Any) -> str:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MessageError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return dtype


# --- the int codecs, shared by FeatureTensor (one frame) and quantize_roundtrip (a batch) -----

def _mean_abs(flat: torch.Tensor) -> torch.Tensor:
    """mean |x| over the last dim by a pairwise tree of element-wise additions: the same bits for
    a frame alone and inside any batch (a library reduction may change its order with the shape)."""
    a = flat.abs()
    n = a.shape[-1]
    width = 1 << max(0, n - 1).bit_length()
    if width != n:
        a = torch.nn.functional.pad(a, (0, width - n))
    while a.shape[-1] > 1:
        a = a[..., 0::2] + a[..., 1::2]
    return a[..., 0] / n


def _int_codes(x: torch.Tensor, dtype: str, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel codes: (codes int8 like x, scale float32 of x's shape up to channel_dim).

    Mid-tread (int8, int4): scale = max|x| / L, codes = round(x / scale) in -L..L; a channel whose
    scale would not be a normal float (all zero, or max|x| / L subnormal or 0) gets scale 1 and
    codes 0: an error below 1e-36 (int4: 1e-4), and no scale a receiver must refuse. Mid-rise
    (int2, int1): step = c x mean|x|, codes = floor(x / step) clamped to the 2^b codes; a step
    below the smallest normal float16 becomes that (a zero channel decodes to +-3e-5), and one
    above MAX_FEATURE_ABS / 1.5 (int2) that, so every value decodes within the bound. Below 8 bits
    the scale is rounded to float16 first, as it travels. Only element-wise ops and exact
    reductions, so a frame's codes do not depend on its batch."""
    x = x.float()
    lead = x.shape[: channel_dim + 1]
    flat = x.reshape(*lead, -1)
    tail = [1] * (x.ndim - channel_dim - 1)
    if dtype in MID_TREAD_LEVELS:
        levels = MID_TREAD_LEVELS[dtype]
        scale = flat.abs().amax(dim=-1) / levels
        scale = torch.where(scale >= (_TINY if dtype == "int8" else _TINY16), scale, torch.ones_like(scale))
        if dtype != "int8":
            scale = scale.half().float()
        codes = torch.round(x / scale.reshape(*lead, *tail)).clamp_(-levels, levels)
    else:
        half = 1 << (DTYPES[dtype] - 1)
        scale = _mean_abs(flat) * MID_RISE_STEP[dtype]
        scale = scale.clamp(_TINY16, MAX_FEATURE_ABS / max(1.0, _max_level(dtype))).half().float()
        codes = torch.floor(x / scale.reshape(*lead, *tail)).clamp_(-half, half - 1)
    return codes.to(torch.int8), scale


def _int_values(codes: torch.Tensor, scale: torch.Tensor, dtype: str, channel_dim: int) -> torch.Tensor:
    view = scale.reshape(*scale.shape, *([1] * (codes.ndim - channel_dim - 1)))
    if dtype in MID_TREAD_LEVELS:
        return codes.float() * view
    return (codes.float() + 0.5) * view


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Signed codes -> code + 2^(bits-1) in `bits` bits each, little-endian, low bits first."""
    per = 8 // bits
    u = (codes.reshape(-1).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-len(u)) % per, dtype=np.uint8)]).reshape(-1, per)
    out = np.zeros(len(u), dtype=np.uint8)
    for j in range(per):
        out |= u[:, j] << np.uint8(j * bits)
    return out.tobytes()


def _unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    """`_pack`'s inverse: n signed codes (int8); MessageError for padding bits that are not 0."""
    per, mask = 8 // bits, (1 << bits) - 1
    b = np.frombuffer(data, dtype=np.uint8)
    u = np.stack([(b >> np.uint8(j * bits)) & np.uint8(mask) for j in range(per)], axis=1).reshape(-1)
    if u[n:].any():
        raise MessageError(f"{bits}-bit feature codes: the padding after the last code must be 0")
    return (u[:n].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def quantize_roundtrip(x: torch.Tensor, dtype: str = "int8", ste: bool = False) -> torch.Tensor:
    """What the edge receives for camera features N x K x S x S sent as `dtype` (float32 result).

    Offline evaluation applies this to reproduce the streaming path bit for bit, and training can
    apply it to learn features that survive the codec: float32 is the identity, float16 rounds,
    the int dtypes quantise each (frame, channel) with its own scale (see DTYPES). With `ste` the
    result carries x's gradient unchanged (straight-through estimator): the forward values are
    the decoded codes, the backward pass is the identity. Runs on any device."""
    _check_dtype(dtype)
    if x.ndim < 2:
        raise MessageError(f"expected N x K x ..., got shape {tuple(x.shape)}")
    xf = x.float()
    if dtype == "float32":
        return xf
    with torch.no_grad():
        if dtype == "float16":
            q = xf.to(torch.float16).float()
        else:
            codes, scale = _int_codes(xf, dtype, channel_dim=1)
            q = _int_values(codes, scale, dtype, channel_dim=1)
    return xf + (q - xf).detach() if ste else q


def feature_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a feature tensor of `shape` (channel first) as `dtype`: codes plus scales."""
    bits = DTYPES[_check_dtype(dtype)]
    data = (math.prod(shape) * bits + 7) // 8
    return data + (_SCALE[dtype].itemsize * shape[0] if dtype in _SCALE else 0)


# --- field validation ---------------------------------------------------------------------

def _int(name: str, value: Any, lo: int, hi: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MessageError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise MessageError(f"{name} must be in {lo}..{hi}, got {value}")
    return int(value)


def _float(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
           optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise MessageError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value) + 0.0  # + 0.0: -0.0 becomes 0.0 (an entropy of -0.0 read as a sign of something)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise MessageError(f"{name} must be finite and in [{lo}, {hi}], got {value}")
    return v


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise MessageError(f"{name} must be a string of at most {MAX_TEXT} characters")
    return value


def _site(value: Any) -> str:
    try:
        return check_site(value)
    except ValueError as err:
        raise MessageError(str(err)) from err


def _cameras(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_CAMERAS:
        raise MessageError(f"{name} must be a list of at most {MAX_CAMERAS} camera ids")
    cams = tuple(_int(f"{name}[]", c, 0, MAX_CAMERAS - 1) for c in value)
    if list(cams) != sorted(set(cams)):
        raise MessageError(f"{name} must be sorted and unique, got {list(cams)}")
    return cams  # type: ignore[return-value]


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their fields this way


def _camera_frame(msg: Any) -> None:
    """Validate (and normalise) what every per-camera, per-frame message carries: site, frame id, camera."""
    _site(msg.site)
    _set(msg, "frame_id", _int("frame_id", msg.frame_id, 0, MAX_FRAME_ID))
    _set(msg, "camera", _int("camera", msg.camera, 0, MAX_CAMERAS - 1))


# --- features -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureTensor:
    """A channel-first tensor on the wire: raw little-endian bytes (packed codes below 8 bits),
    dtype, shape, and for the int dtypes one float32 scale per channel."""

    data: bytes
    dtype: str  # one of DTYPES: "float32" | "float16" | "int8" | "int4" | "int2" | "int1"
    shape: tuple[int, ...]  # channel first, e.g. (12, 8, 8)
    scale: bytes | None = None  # int dtypes only: shape[0] little-endian scales (float32 for int8, else float16)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise MessageError(f"feature dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.shape, (tuple, list)) or not 1 <= len(self.shape) <= MAX_DIMS:
            raise MessageError(f"feature shape must have 1..{MAX_DIMS} dims, got {self.shape!r}")
        shape = tuple(_int("feature shape[]", d, 1, MAX_ELEMENTS) for d in self.shape)
        _set(self, "shape", shape)
        numel = math.prod(shape)
        if numel > MAX_ELEMENTS:
            raise MessageError(f"feature tensor of {numel} elements exceeds the cap of {MAX_ELEMENTS}")
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise MessageError(f"feature data must be bytes, got {type(self.data).__name__}")
        _set(self, "data", bytes(self.data))
        bits = DTYPES[self.dtype]
        need = (numel * bits + 7) // 8
        if len(self.data) != need:
            raise MessageError(f"feature data has {len(self.data)} bytes, {self.dtype} {shape} needs {need}")
        if self.dtype.startswith("int"):
            if not isinstance(self.scale, (bytes, bytearray, memoryview)):
                raise MessageError(f"{self.dtype} features need per-channel scale bytes")
            _set(self, "scale", bytes(self.scale))
            width = _SCALE[self.dtype].itemsize
            if len(self.scale) != width * shape[0]:
                raise MessageError(f"{self.dtype} scale has {len(self.scale)} bytes, {shape[0]} channels need "
                                   f"{width * shape[0]}")
            s = np.frombuffer(self.scale, dtype=_SCALE[self.dtype]).astype(np.float64)
            top = MAX_FEATURE_ABS / max(1.0, _max_level(self.dtype))  # so that every value decodes within the bound
            if not (np.isfinite(s).all() and (s > 0).all() and (s <= top * SCALE_ROUNDING).all()):
                raise MessageError(f"{self.dtype} scales must be positive and at most {top:g}")
            codes = self._codes()
            if self.dtype in MID_TREAD_LEVELS and (np.abs(codes.astype(np.int16)) > MID_TREAD_LEVELS[self.dtype]).any():
                levels = MID_TREAD_LEVELS[self.dtype]
                raise MessageError(f"{self.dtype} codes must be in -{levels}..{levels}")
        else:
            if self.scale is not None:
                raise MessageError(f"{self.dtype} features carry no scale")
            values = np.frombuffer(self.data, dtype=_FLOAT[self.dtype])
            if not np.isfinite(values).all():
                raise MessageError(f"{self.dtype} features must be finite")
            if (np.abs(values) > MAX_FEATURE_ABS).any():
                raise MessageError(f"{self.dtype} features must be at most {MAX_FEATURE_ABS:g} in magnitude")

    def _codes(self) -> np.ndarray:
        """The signed codes of an int dtype, flat (int8)."""
        if self.dtype == "int8":
            return np.frombuffer(self.data, dtype="i1")
        return _unpack(self.data, DTYPES[self.dtype], math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return len(self.data) + (len(self.scale) if self.scale is not None else 0)

    @classmethod
    def quantize(cls, x: torch.Tensor, dtype: str = "int8") -> "FeatureTensor":
        """Encode float features K x S x S (any channel-first shape) as `dtype`."""
        _check_dtype(dtype)
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise MessageError("features must be finite")
        if bool((x.abs() > MAX_FEATURE_ABS).any()):
            raise MessageError(f"features must be at most {MAX_FEATURE_ABS:g} in magnitude")
        shape = tuple(x.shape)
        if dtype.startswith("int"):
            codes, scale = _int_codes(x, dtype, channel_dim=0)
            codes_np = codes.contiguous().numpy()
            data = codes_np.tobytes() if dtype == "int8" else _pack(codes_np, DTYPES[dtype])
            return cls(data, dtype, shape, scale.contiguous().numpy().astype(_SCALE[dtype]).tobytes())
        cast = x.to(torch.float16 if dtype == "float16" else torch.float32)  # overflow becomes inf, refused below
        return cls(cast.contiguous().numpy().astype(_FLOAT[dtype], copy=False).tobytes(), dtype, shape)

    def to_tensor(self) -> torch.Tensor:
        """The float32 values (int dtypes: decoded codes and per-channel scales)."""
        if self.dtype.startswith("int"):
            codes = torch.from_numpy(self._codes().astype(np.int8, copy=True).reshape(self.shape))
            scale = torch.from_numpy(np.frombuffer(self.scale or b"", dtype=_SCALE[self.dtype]).astype(np.float32))
            return _int_values(codes, scale, self.dtype, channel_dim=0)
        arr = np.frombuffer(self.data, dtype=_FLOAT[self.dtype]).reshape(self.shape)
        return torch.from_numpy(arr.astype(np.float32, copy=True))

    WIRE_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "shape", "data", "scale")  # the compact form's order

    def to_wire(self) -> dict[str, Any]:
        """The named form: {"dtype", "shape", "data", "scale"}."""
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data, "scale": self.scale}

    def to_compact(self) -> list[Any]:
        """The compact form, as sent: [dtype, shape, data, scale]."""
        return [self.dtype, list(self.shape), self.data, self.scale]

    @classmethod
    def named(cls, obj: Any) -> Any:
        """The named form of features in either form; anything else is returned as it is (and
        refused by `from_wire`)."""
        if isinstance(obj, list) and len(obj) == len(cls.WIRE_FIELDS):
            return dict(zip(cls.WIRE_FIELDS, obj))
        return obj

    @classmethod
    def from_wire(cls, obj: Any) -> "FeatureTensor":
        obj = cls.named(obj)
        if not isinstance(obj, dict) or set(obj) != set(cls.WIRE_FIELDS):
            raise MessageError("features must be [dtype, shape, data, scale] or a map with those four keys")
        return cls(data=obj["data"], dtype=obj["dtype"], shape=obj["shape"], scale=obj["scale"])


# --- messages -----------------------------------------------------------------------------

_BY_TAG: dict[str, type["_Message"]] = {}  # every message class by its tag, for the compact form


def _packb(value: Any, use_single_float: bool = False) -> bytes:
    return msgpack.packb(value, use_bin_type=True, use_single_float=use_single_float)


def array_header(n: int) -> bytes:
    """The msgpack header of an array of n items (what precedes its packed items)."""
    return msgpack.Packer().pack_array_header(n)


def _float32(value: float | None) -> float | None:
    """`value` rounded to float32 (what a FLOAT32_FIELDS field holds, so that it survives the wire as it is)."""
    return None if value is None else float(np.float32(value))


class _Message:
    """encode/decode shared by every message: a versioned msgpack array of the dataclass fields
    (the compact form; the named map is accepted too, see the module doc)."""

    TAG: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]
    FLOAT32_FIELDS: ClassVar[frozenset[str]] = frozenset()  # sent as float32: values held at float32 precision

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _BY_TAG.setdefault(cls.TAG, cls) is not cls:
            raise TypeError(f"message tag {cls.TAG!r} is taken by {_BY_TAG[cls.TAG].__name__}")

    def _values(self, compact: bool) -> list[Any]:
        out = []
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, FeatureTensor):
                value = value.to_compact() if compact else value.to_wire()
            elif isinstance(value, tuple):
                value = list(value)
            out.append(value)
        return out

    def _wire(self) -> dict[str, Any]:
        """The named form: {"v": WIRE_VERSION, "t": TAG, field: value, ...}."""
        return {"v": WIRE_VERSION, "t": self.TAG, **dict(zip(self.FIELDS, self._values(compact=False)))}

    def packed_items(self) -> list[bytes]:
        """Each item of the compact form packed alone: version, tag, then the fields in FIELDS
        order (float32 for those in FLOAT32_FIELDS); the message is an array header and these."""
        out = [_packb(WIRE_VERSION), _packb(self.TAG)]
        for name, value in zip(self.FIELDS, self._values(compact=True)):
            out.append(_packb(value, use_single_float=name in self.FLOAT32_FIELDS))
        return out

    def encode(self) -> bytes:
        """The compact form, as sent: [WIRE_VERSION, TAG, *values in FIELDS order]."""
        items = self.packed_items()
        raw = array_header(len(items)) + b"".join(items)
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(f"{self.TAG} message of {len(raw)} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
        return raw

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview):
        obj = unpack(raw)
        if obj.get("t") != cls.TAG:
            raise MessageError(f"expected a {cls.TAG!r} message, got {obj.get('t')!r}")
        return cls._from_map(obj)

    @classmethod
    def _from_map(cls, obj: dict[str, Any]):
        keys = set(obj) - {"v", "t"}
        if keys != set(cls.FIELDS):
            missing, extra = sorted(set(cls.FIELDS) - keys), sorted(keys - set(cls.FIELDS))
            raise MessageError(f"{cls.TAG} message fields: missing {missing}, unexpected {extra}")
        kwargs = {name: obj[name] for name in cls.FIELDS}
        try:
            if "features" in kwargs:
                kwargs["features"] = FeatureTensor.from_wire(kwargs["features"])
            return cls(**kwargs)
        except (TypeError, KeyError, OverflowError) as err:  # a field of a type the validators did not expect
            raise MessageError(f"{cls.TAG} message: {err}") from err


def _named(values: list[Any]) -> dict[str, Any]:
    """A compact message [v, tag, *values] as its named map (version and fields checked later)."""
    if len(values) < 2:
        raise MessageError(f"a message array starts with version and type tag, got {len(values)} items")
    version, tag = values[0], values[1]
    cls = _BY_TAG.get(tag) if isinstance(tag, str) else None
    if cls is None:  # the version check comes first, so an unknown version is named as such
        return {"v": version, "t": tag if isinstance(tag, str) else None}
    if len(values) != 2 + len(cls.FIELDS):
        raise MessageError(f"a {tag!r} message has {len(cls.FIELDS)} fields {list(cls.FIELDS)}, got {len(values) - 2}")
    obj = {"v": version, "t": tag, **dict(zip(cls.FIELDS, values[2:]))}
    if "features" in obj:
        obj["features"] = FeatureTensor.named(obj["features"])
    return obj


def unpack(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Raw bytes (either form) -> the message's named map, with its version checked;
    MessageError on anything else."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message is bytes, got {type(raw).__name__}")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, use_list=True,
                              max_str_len=MAX_MESSAGE_BYTES, max_bin_len=MAX_MESSAGE_BYTES,
                              max_array_len=MAX_ELEMENTS, max_map_len=64, max_ext_len=0)
    except (ValueError, TypeError, OverflowError) as err:  # msgpack's errors are ValueErrors
        raise MessageError(f"not a msgpack message: {str(err) or type(err).__name__}") from err
    if isinstance(obj, list):
        obj = _named(obj)
    if not isinstance(obj, dict):
        raise MessageError(f"a message is a msgpack array or map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version != WIRE_VERSION:  # not 1.0, not True: the int itself
        raise MessageError(f"wire version {version!r}, this code speaks {WIRE_VERSION}")
    if type(obj.get("t")) is not str:
        raise MessageError(f"message tag must be a string, got {type(obj.get('t')).__name__}")
    return obj


@dataclass(frozen=True)
class CameraObservation(_Message):
    """One camera's output for one frame: its features and (ADA) its own prediction and entropy."""

    TAG: ClassVar[str] = "obs"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "camera", "captured_at", "prediction", "entropy",
                                         "features", "label")
    FLOAT32_FIELDS: ClassVar[frozenset[str]] = frozenset({"entropy"})

    site: str
    frame_id: int
    camera: int
    captured_at: float  # seconds since the epoch, when the frame was captured
    prediction: int | None  # the camera classifier's class (None for DDNN cameras)
    entropy: float | None  # its normalized entropy in [0, 1]
    features: FeatureTensor
    label: int | None = None  # ground truth, carried only by replays to score accuracy

    def __post_init__(self) -> None:
        _camera_frame(self)
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0, MAX_TIME_S))
        _set(self, "prediction", _int("prediction", self.prediction, 0, MAX_CLASSES - 1, optional=True))
        _set(self, "entropy", _float32(_float("entropy", self.entropy, 0.0, 1.0, optional=True)))
        if (self.prediction is None) != (self.entropy is None):
            raise MessageError("prediction and entropy come together or not at all")
        if not isinstance(self.features, FeatureTensor):
            raise MessageError("features must be a FeatureTensor")
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))


@dataclass(frozen=True)
class CameraSummary(_Message):
    """Lazy upload: one camera's verdict on a frame without its features, which the camera keeps
    for a while in case the edge asks (`FeatureRequest`). ADA-DDNN cameras only."""

    TAG: ClassVar[str] = "sum"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "camera", "captured_at", "prediction", "entropy", "label")
    FLOAT32_FIELDS: ClassVar[frozenset[str]] = frozenset({"entropy"})

    site: str
    frame_id: int
    camera: int
    captured_at: float  # seconds since the epoch, when the frame was captured
    prediction: int  # the camera classifier's class
    entropy: float  # its normalized entropy in [0, 1]
    label: int | None = None  # ground truth, carried only by replays to score accuracy

    def __post_init__(self) -> None:
        _camera_frame(self)
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0, MAX_TIME_S))
        _set(self, "prediction", _int("prediction", self.prediction, 0, MAX_CLASSES - 1))
        _set(self, "entropy", _float32(_float("entropy", self.entropy, 0.0, 1.0)))
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))


@dataclass(frozen=True)
class FeatureRequest(_Message):
    """Lazy upload: the edge asks the site's cameras for one frame's features (a frame that did
    not leave at exit 1). Published once on the site's request topic; every camera hears it and
    those named answer."""

    TAG: ClassVar[str] = "freq"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "cameras")

    site: str
    frame_id: int
    cameras: tuple[int, ...]  # the cameras asked, sorted, at least one

    # In the compact form the cameras travel as a bitmask (bit k: camera k), one byte for up to
    # seven cameras where their list takes one more byte a camera; a list where a camera id is 64
    # or more (msgpack ints are 64-bit). Receivers take either (cameras older than the bitmask
    # take only the list: upgrade the cameras before the edge).
    MASK_CAMERAS: ClassVar[int] = 64

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "frame_id", _int("frame_id", self.frame_id, 0, MAX_FRAME_ID))
        cams = self.cameras
        if isinstance(cams, (int, np.integer)) and not isinstance(cams, bool):
            mask = _int("cameras (bitmask)", cams, 0, (1 << self.MASK_CAMERAS) - 1)
            cams = [k for k in range(self.MASK_CAMERAS) if mask >> k & 1]
        _set(self, "cameras", _cameras("cameras", cams))
        if not self.cameras:
            raise MessageError("a feature request names at least one camera")

    def _values(self, compact: bool) -> list[Any]:
        values = super()._values(compact)
        if compact and self.cameras[-1] < self.MASK_CAMERAS:
            values[self.FIELDS.index("cameras")] = sum(1 << k for k in self.cameras)
        return values


@dataclass(frozen=True)
class CameraFeatures(_Message):
    """Lazy upload: a camera's features of a frame, the answer to a `FeatureRequest`."""

    TAG: ClassVar[str] = "feat"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "camera", "features")

    site: str
    frame_id: int
    camera: int
    features: FeatureTensor

    def __post_init__(self) -> None:
        _camera_frame(self)
        if not isinstance(self.features, FeatureTensor):
            raise MessageError("features must be a FeatureTensor")


def decode_one_of(raw: bytes | bytearray | memoryview, *classes: type[_Message]):
    """Decode a message that may be any of `classes` (by its type tag); MessageError otherwise."""
    obj = unpack(raw)
    for cls in classes:
        if obj.get("t") == cls.TAG:
            return cls._from_map(obj)
    raise MessageError(f"expected one of {[c.TAG for c in classes]} messages, got {obj.get('t')!r}")


@dataclass(frozen=True)
class CameraStatus(_Message):
    """A camera's liveness, retained on its status topic; "offline" is also its MQTT last will."""

    TAG: ClassVar[str] = "status"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "camera", "state", "at")
    STATES: ClassVar[tuple[str, ...]] = ("online", "offline", "done")

    site: str
    camera: int
    state: str
    at: float  # seconds since the epoch (0 for a last will, whose time is unknown in advance)

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "camera", _int("camera", self.camera, 0, MAX_CAMERAS - 1))
        if self.state not in self.STATES:
            raise MessageError(f"state must be one of {self.STATES}, got {self.state!r}")
        _set(self, "at", _float("at", self.at, 0.0, MAX_TIME_S))


@dataclass(frozen=True)
class Escalation(_Message):
    """A frame the edge could not answer: the fused features the cloud runs on."""

    TAG: ClassVar[str] = "esc"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "present", "captured_at", "features",
                                         "edge_entropy", "edge_prediction", "label")

    site: str
    frame_id: int
    present: tuple[int, ...]  # cameras whose observations were fused, sorted
    captured_at: float
    features: FeatureTensor  # fused, fused_channels x S x S
    edge_entropy: float
    edge_prediction: int
    label: int | None = None

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "frame_id", _int("frame_id", self.frame_id, 0, MAX_FRAME_ID))
        _set(self, "present", _cameras("present", self.present))
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0, MAX_TIME_S))
        if not isinstance(self.features, FeatureTensor):
            raise MessageError("features must be a FeatureTensor")
        _set(self, "edge_entropy", _float("edge_entropy", self.edge_entropy, 0.0, 1.0))
        _set(self, "edge_prediction", _int("edge_prediction", self.edge_prediction, 0, MAX_CLASSES - 1))
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))


@dataclass(frozen=True)
class Decision(_Message):
    """The one result of a frame: which exit answered, with what class, when."""

    TAG: ClassVar[str] = "dec"
    FIELDS: ClassVar[tuple[str, ...]] = ("site", "frame_id", "exit", "prediction", "entropy", "camera", "present",
                                         "captured_at", "decided_at", "by", "label")

    site: str
    frame_id: int
    exit: str  # "exit1" | "exit2" | "cloud"
    prediction: int
    entropy: float | None  # normalized entropy of the classifier that answered
    camera: int | None  # the camera that answered at exit 1, else None
    present: tuple[int, ...]
    captured_at: float
    decided_at: float  # seconds since the epoch
    by: str = ""  # service id of the aggregator or worker that decided
    label: int | None = None

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "frame_id", _int("frame_id", self.frame_id, 0, MAX_FRAME_ID))
        if self.exit not in EXIT_NAMES:
            raise MessageError(f"exit must be one of {EXIT_NAMES}, got {self.exit!r}")
        _set(self, "prediction", _int("prediction", self.prediction, 0, MAX_CLASSES - 1))
        _set(self, "entropy", _float("entropy", self.entropy, 0.0, 1.0, optional=True))
        _set(self, "camera", _int("camera", self.camera, 0, MAX_CAMERAS - 1, optional=True))
        if (self.camera is not None) != (self.exit == "exit1"):
            raise MessageError("camera is set exactly when the frame left at exit 1")
        _set(self, "present", _cameras("present", self.present))
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0, MAX_TIME_S))
        _set(self, "decided_at", _float("decided_at", self.decided_at, 0.0, MAX_TIME_S))
        _text("by", self.by)
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))

    @property
    def latency_ms(self) -> float:
        return 1000.0 * (self.decided_at - self.captured_at)

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.prediction == self.label


def summary_of(obs: CameraObservation) -> CameraSummary:
    """The summary a lazy camera sends in place of observation `obs` (ADA-DDNN: it has a prediction)."""
    if obs.prediction is None or obs.entropy is None:
        raise MessageError(f"site {obs.site!r} frame {obs.frame_id} camera {obs.camera}: no prediction to summarise "
                           "(DDNN cameras have no classifier: they upload eagerly)")
    return CameraSummary(obs.site, obs.frame_id, obs.camera, obs.captured_at, obs.prediction, obs.entropy, obs.label)


def observation_bytes(features: torch.Tensor, dtype: str = "int8", site: str = "site", frame_id: int = 0,
                      camera: int = 0, with_prediction: bool = True) -> int:
    """Encoded size of one camera observation carrying `features` (K x S x S) as `dtype`, without
    the label (which only replays carry): what a camera sends per frame."""
    obs = CameraObservation(site, frame_id, camera, 0.0, 0 if with_prediction else None,
                            0.5 if with_prediction else None, FeatureTensor.quantize(features, dtype))
    return len(obs.encode())


__all__ = ["MessageError", "FeatureTensor", "CameraObservation", "CameraSummary", "FeatureRequest", "CameraFeatures",
           "CameraStatus", "Escalation", "Decision", "quantize_roundtrip", "feature_nbytes", "observation_bytes",
           "summary_of", "decode_one_of", "unpack", "WIRE_VERSION", "MAX_MESSAGE_BYTES", "DTYPES", "EXIT_NAMES"]
