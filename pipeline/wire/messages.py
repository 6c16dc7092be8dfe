"""The wire format: versioned msgpack maps, one frozen dataclass per message, no pickle anywhere.

    CameraObservation  camera -> edge    (MQTT ada/{site}/cam/{cam}/obs, QoS 1)
    CameraStatus       camera -> anyone  (MQTT ada/{site}/cam/{cam}/status, retained; last will)
    Escalation         edge -> cloud     (Redis stream ada:{site}:escalations)
    Decision           edge/cloud -> out (MQTT ada/{site}/results and stream ada:{site}:results)

Every message is a msgpack map {"v": WIRE_VERSION, "t": <type tag>, ...fields}. Features travel
as a `FeatureTensor`: raw little-endian bytes with dtype, shape and (for int8) one float32 scale
per channel. int8 is the default on the camera link (768 bytes for 12 x 8 x 8 features);
float16 and float32 are selectable, and float32 is exact.

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

from pipeline.errors import MessageError
from pipeline.wire.names import check_site

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # hard cap on one encoded message (a float32 6 x 12 x 8 x 8 tensor is 18 KiB)
MAX_ELEMENTS = 1 << 18  # hard cap on the elements of one feature tensor
MAX_DIMS = 4  # feature tensors are channel-first, at most K x S x S (plus one spare dim)
MAX_CAMERAS = 256  # camera ids are 0..255
MAX_CLASSES = 1 << 16  # class ids are 0..65535
MAX_FRAME_ID = (1 << 63) - 1
MAX_TEXT = 256  # characters of a free-text field (service ids, reasons)
# Largest feature magnitude on the wire: float16's largest finite value. Camera features are
# batch-normalised (|x| in the tens); anything near float32's range overflows the edge block into
# NaN, so such a message is refused at the door instead of poisoning a frame's computation.
MAX_FEATURE_ABS = 65504.0
INT8_LEVELS = 127  # symmetric int8: codes in -127..127, scale = max|x| / 127 per channel

DTYPES: dict[str, np.dtype] = {
    "int8": np.dtype("i1"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
EXIT_NAMES = ("exit1", "exit2", "cloud")  # every exit a frame can leave by, in the order of the tiers



# --- the int8 codec, shared by FeatureTensor (one frame) and quantize_roundtrip (a batch) ----

def _int8_codes(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: (codes int8 like x, scale float32 of x's shape up to channel_dim).

    scale = max|x| / 127 over each channel; codes = round(x / scale). A channel whose scale would
    not be a normal float32 (all zero, or so close to zero that max|x| / 127 is subnormal or
    underflows to 0) gets scale 1, so its codes are 0: an error below 1e-36, and no scale that a
    receiver must refuse. Only element-wise ops and exact reductions, so a frame's codes do not
    depend on its batch."""
    x = x.float()
    lead = x.shape[: channel_dim + 1]
    amax = x.reshape(*lead, -1).abs().amax(dim=-1)
    scale = amax / INT8_LEVELS
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    view = scale.reshape(*lead, *([1] * (x.ndim - channel_dim - 1)))
    codes = torch.round(x / view).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return codes, scale


def _int8_values(codes: torch.Tensor, scale: torch.Tensor, channel_dim: int) -> torch.Tensor:
    view = scale.reshape(*scale.shape, *([1] * (codes.ndim - channel_dim - 1)))
    return codes.float() * view


def quantize_roundtrip(x: torch.Tensor, dtype: str = "int8") -> torch.Tensor:
    """What the edge receives for camera features N x K x S x S sent as `dtype` (float32 result).

    Offline evaluation applies this to reproduce the streaming path bit for bit: float32 is the
    identity, float16 rounds, int8 quantises each (frame, channel) with its own scale."""
    if dtype not in DTYPES:
        raise MessageError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if x.ndim < 2:
        raise MessageError(f"expected N x K x ..., got shape {tuple(x.shape)}")
    if dtype == "float32":
        return x.float()
    if dtype == "float16":
        return x.to(torch.float16).float()
    codes, scale = _int8_codes(x, channel_dim=1)
    return _int8_values(codes, scale, channel_dim=1)


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
    v = float(value)
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


# --- features -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureTensor:
    """A channel-first tensor on the wire: raw little-endian bytes, dtype, shape, int8 scales."""

    data: bytes
    dtype: str  # "int8" | "float16" | "float32"
    shape: tuple[int, ...]  # channel first, e.g. (12, 8, 8)
    scale: bytes | None = None  # int8 only: shape[0] little-endian float32 scales

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
        dt = DTYPES[self.dtype]
        if len(self.data) != numel * dt.itemsize:
            raise MessageError(f"feature data has {len(self.data)} bytes, {self.dtype} {shape} needs {numel * dt.itemsize}")
        if self.dtype == "int8":
            if not isinstance(self.scale, (bytes, bytearray, memoryview)):
                raise MessageError("int8 features need per-channel scale bytes")
            _set(self, "scale", bytes(self.scale))
            if len(self.scale) != 4 * shape[0]:
                raise MessageError(f"int8 scale has {len(self.scale)} bytes, {shape[0]} channels need {4 * shape[0]}")
            s = np.frombuffer(self.scale, dtype="<f4")
            if not (np.isfinite(s).all() and (s > 0).all() and (s <= MAX_FEATURE_ABS / 127).all()):
                raise MessageError(f"int8 scales must be positive and at most {MAX_FEATURE_ABS / 127:g}")
            codes = np.frombuffer(self.data, dtype=dt)
            if (codes == -128).any():
                raise MessageError("int8 codes must be in -127..127")
        else:
            if self.scale is not None:
                raise MessageError(f"{self.dtype} features carry no scale")
            values = np.frombuffer(self.data, dtype=dt)
            if not np.isfinite(values).all():
                raise MessageError(f"{self.dtype} features must be finite")
            if (np.abs(values) > MAX_FEATURE_ABS).any():
                raise MessageError(f"{self.dtype} features must be at most {MAX_FEATURE_ABS:g} in magnitude")

    @property
    def nbytes(self) -> int:
        return len(self.data) + (len(self.scale) if self.scale is not None else 0)

    @classmethod
    def quantize(cls, x: torch.Tensor, dtype: str = "int8") -> "FeatureTensor":
        """Encode float features K x S x S (any channel-first shape) as `dtype`."""
        if dtype not in DTYPES:
            raise MessageError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise MessageError("features must be finite")
        if bool((x.abs() > MAX_FEATURE_ABS).any()):
            raise MessageError(f"features must be at most {MAX_FEATURE_ABS:g} in magnitude")
        shape = tuple(x.shape)
        if dtype == "int8":
            codes, scale = _int8_codes(x, channel_dim=0)
            return cls(codes.contiguous().numpy().tobytes(), dtype, shape,
                       scale.contiguous().numpy().astype("<f4").tobytes())
        cast = x.to(torch.float16 if dtype == "float16" else torch.float32)  # overflow becomes inf, refused below
        return cls(cast.contiguous().numpy().astype(DTYPES[dtype], copy=False).tobytes(), dtype, shape)

    def to_tensor(self) -> torch.Tensor:
        """The float32 values (int8: codes x per-channel scale)."""
        arr = np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)
        if self.dtype == "int8":
            codes = torch.from_numpy(arr.astype(np.int8, copy=True))
            scale = torch.from_numpy(np.frombuffer(self.scale or b"", dtype="<f4").astype(np.float32, copy=True))
            return _int8_values(codes, scale, channel_dim=0)
        return torch.from_numpy(arr.astype(np.float32, copy=True))

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data, "scale": self.scale}

    @classmethod
    def from_wire(cls, obj: Any) -> "FeatureTensor":
        if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data", "scale"}:
            raise MessageError("features must be a map with dtype, shape, data and scale")
        return cls(data=obj["data"], dtype=obj["dtype"], shape=obj["shape"], scale=obj["scale"])


# --- messages -----------------------------------------------------------------------------

class _Message:
    """encode/decode shared by every message: a versioned msgpack map of the dataclass fields."""

    TAG: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]

    def _wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": WIRE_VERSION, "t": self.TAG}
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, FeatureTensor):
                value = value.to_wire()
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def encode(self) -> bytes:
        raw = msgpack.packb(self._wire(), use_bin_type=True)
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(f"{self.TAG} message of {len(raw)} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
        return raw

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview):
        obj = unpack(raw)
        if obj.get("t") != cls.TAG:
            raise MessageError(f"expected a {cls.TAG!r} message, got {obj.get('t')!r}")
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


def unpack(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Raw bytes -> the message map, with its version checked; MessageError on anything else."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message is bytes, got {type(raw).__name__}")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(raw)} bytes exceeds the cap of {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, use_list=True,
                              max_str_len=MAX_MESSAGE_BYTES, max_bin_len=MAX_MESSAGE_BYTES,
                              max_array_len=MAX_ELEMENTS, max_map_len=64, max_ext_len=0)
    except (ValueError, TypeError, OverflowError) as err:  # msgpack's errors are ValueErrors
        raise MessageError(f"not a msgpack message: {err}") from err
    if not isinstance(obj, dict):
        raise MessageError(f"a message is a msgpack map, got {type(obj).__name__}")
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

    site: str
    frame_id: int
    camera: int
    captured_at: float  # seconds since the epoch, when the frame was captured
    prediction: int | None  # the camera classifier's class (None for DDNN cameras)
    entropy: float | None  # its normalized entropy in [0, 1]
    features: FeatureTensor
    label: int | None = None  # ground truth, carried only by replays to score accuracy

    def __post_init__(self) -> None:
        _site(self.site)
        _set(self, "frame_id", _int("frame_id", self.frame_id, 0, MAX_FRAME_ID))
        _set(self, "camera", _int("camera", self.camera, 0, MAX_CAMERAS - 1))
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0))
        _set(self, "prediction", _int("prediction", self.prediction, 0, MAX_CLASSES - 1, optional=True))
        _set(self, "entropy", _float("entropy", self.entropy, 0.0, 1.0, optional=True))
        if (self.prediction is None) != (self.entropy is None):
            raise MessageError("prediction and entropy come together or not at all")
        if not isinstance(self.features, FeatureTensor):
            raise MessageError("features must be a FeatureTensor")
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))


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
        _set(self, "at", _float("at", self.at, 0.0))


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
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0))
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
        _set(self, "captured_at", _float("captured_at", self.captured_at, 0.0))
        _set(self, "decided_at", _float("decided_at", self.decided_at, 0.0))
        _text("by", self.by)
        _set(self, "label", _int("label", self.label, 0, MAX_CLASSES - 1, optional=True))

    @property
    def latency_ms(self) -> float:
        return 1000.0 * (self.decided_at - self.captured_at)

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.prediction == self.label


def observation_bytes(features: torch.Tensor, dtype: str = "int8", site: str = "site", frame_id: int = 0,
                      camera: int = 0, with_prediction: bool = True) -> int:
    """Encoded size of one camera observation carrying `features` (K x S x S) as `dtype`, without
    the label (which only replays carry): what a camera sends per frame."""
    obs = CameraObservation(site, frame_id, camera, 0.0, 0 if with_prediction else None,
                            0.5 if with_prediction else None, FeatureTensor.quantize(features, dtype))
    return len(obs.encode())


__all__ = ["MessageError", "FeatureTensor", "CameraObservation", "CameraStatus", "Escalation", "Decision",
           "quantize_roundtrip", "observation_bytes", "unpack", "WIRE_VERSION", "MAX_MESSAGE_BYTES", "DTYPES",
           "EXIT_NAMES"]
