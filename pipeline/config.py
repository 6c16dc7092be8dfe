"""Configuration dataclasses: the network's sizes and the training recipe.

Every size that shapes a tensor lives in `ModelConfig`; a checkpoint stores it and refuses to
load into code whose config differs. `TrainConfig` holds the recipe. Role configs for the
streaming processes live next to those processes; `pipeline.settings` turns any of them into
flags and `ADA_DDNN_*` env vars.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.settings import check_fields

Mode = Literal["ada", "ddnn"]
Fusion = Literal["max", "mean", "concat"]
ViewMode = Literal["viewpoints", "tiles"]

MODES: tuple[str, ...] = ("ada", "ddnn")
FUSIONS: tuple[str, ...] = ("max", "mean", "concat")
VIEW_MODES: tuple[str, ...] = ("viewpoints", "tiles")
# The wire codes (pipeline.wire.messages.DTYPES, which checks this list), widest first.
WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "int8", "int4", "int2", "int1")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that shapes the network (ADA-DDNN and the DDNN baseline)."""

    mode: str = field(default="ada", metadata={"choices": MODES})  # ada: camera classifiers and exit 1; ddnn: neither (the baseline)
    num_cameras: int = field(default=6, metadata={"cli": False, "min": 1})  # end devices; the paper uses n = 6
    num_classes: int = field(default=10, metadata={"cli": False, "min": 1})  # CIFAR-10
    image_size: int = field(default=32, metadata={"cli": False, "min": 1})  # pixels, square; each camera's view has the scene's size
    view_mode: str = field(default="viewpoints", metadata={"choices": VIEW_MODES, "flags": ["--views", "--view-mode"]})  # viewpoints (six perspectives) or tiles (DDNN's 3x2 split)

    # Camera (end device): stem -> four residual layers -> {classifier head, wire bottleneck}.
    camera_stem_stride: int = field(default=2, metadata={"min": 1, "max": 2})  # 2 halves the resolution once, so the residual layers run at 16x16
    camera_channels: int = field(default=32, metadata={"min": 1})  # width of the four residual layers
    camera_residual_layers: int = field(default=4, metadata={"min": 0})  # the paper's feature module: four 3x3 residual layers
    camera_head_channels: int = field(default=32, metadata={"min": 1})  # first strided conv of the classifier head; the second doubles it
    wire_channels: int = field(default=12, metadata={"min": 1})  # channels a camera sends; 12 x 8 x 8 int8 = 768 bytes per frame
    wire_size: int = field(default=8, metadata={"min": 1})  # spatial side of the features a camera sends (adaptive average pool)
    # The feature code the network is trained for: training sends the camera features through the
    # wire codec (`pipeline.wire.messages.quantize_roundtrip`) with a straight-through gradient, so
    # edge and cloud learn on what they receive (quantization-aware training). float32 = no codec.
    # Cameras send this code unless told otherwise (`--wire-dtype`); docs/MODEL.md.
    wire_dtype: str = field(default="float32", metadata={"choices": WIRE_DTYPES})  # float32, float16, int8, int4, int2 or int1

    # Edge: fusion of camera features -> edge block -> classifier (exit 2).
    fusion: str = field(default="concat", metadata={"choices": FUSIONS})  # max, mean or concat; missing cameras are masked in all three
    edge_channels: int = field(default=64, metadata={"min": 1})  # width of the edge block
    edge_blocks: int = field(default=1, metadata={"min": 0})  # residual blocks in the edge block (8x8)

    # Cloud: fused features -> deeper block -> classifier (always answers).
    cloud_channels: int = field(default=96, metadata={"min": 1})  # width of the first cloud stage (8x8); the second stage (4x4) doubles it
    cloud_blocks: int = field(default=1, metadata={"min": 0})  # residual blocks per cloud stage

    def __post_init__(self) -> None:
        check_fields(self)  # choices and ranges, as declared on the fields
        if self.view_mode == "tiles" and self.num_cameras != 6:
            raise ValueError("view_mode 'tiles' is the 3x2 split and needs num_cameras = 6")

    @property
    def has_camera_classifiers(self) -> bool:
        return self.mode == "ada"

    @property
    def fused_channels(self) -> int:
        """Channels of the fused feature map the edge block and the cloud see."""
        return self.wire_channels * (self.num_cameras if self.fusion == "concat" else 1)

    @property
    def wire_shape(self) -> tuple[int, int, int]:
        return (self.wire_channels, self.wire_size, self.wire_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Defaults follow the paper (SGD, lr 0.1, cosine, batch 200) except the
    number of epochs, which `--epochs 180` sets to the paper's value."""

    epochs: int = field(default=30, metadata={"min": 1})  # passes over the 45,000 training images; the paper uses 180
    batch_size: int = field(default=200, metadata={"min": 1})  # frames per step (the paper's value)
    lr: float = field(default=0.1, metadata={"min": 0})  # peak SGD learning rate (the paper's value); 0 moves only the batch-norm statistics
    momentum: float = field(default=0.9, metadata={"min": 0, "max": 1})  # SGD momentum (the paper's value)
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = field(default=5e-4, metadata={"min": 0})  # L2 on conv/linear weights, not on BN or biases
    warmup_epochs: float = field(default=1.0, metadata={"min": 0})  # linear warm-up before the cosine decay, in epochs
    label_smoothing: float = 0.0  # of every exit's cross-entropy target; 0 = hard labels (see docs/MODEL.md's ablation)
    # Self-distillation: the cloud, the strongest classifier, teaches the early exits. Its softened
    # outputs carry which wrong classes are close (cat vs dog), which hard labels do not, and the
    # camera and edge classifiers are small, exactly the students that gain most from that
    # (Zhang et al., "Be Your Own Teacher", 2019). The teacher gets no gradient from these terms.
    distill: float = field(default=0.0, metadata={"min": 0})  # weight of w_cam * KD_cameras + w_edge * KD_edge in the joint loss; 0 = off (see docs/MODEL.md's ablation)
    distill_temperature: float = field(default=3.0, metadata={"above": 0})  # softmax temperature T of teacher and students (KD is scaled by T^2); 1 = plain softmax
    # Loss weights of the joint objective: sum of w * CE for every exit.
    weight_camera: float = field(default=1.0, metadata={"min": 0})  # loss weight of the camera exits (each camera's CE averaged over the cameras present)
    weight_edge: float = field(default=1.0, metadata={"min": 0})  # loss weight of exit 2
    weight_cloud: float = field(default=1.0, metadata={"min": 0})  # loss weight of the cloud exit
    camera_dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})  # probability that each camera is absent from a training frame
    augment: bool = True  # random crop (pad 4) and horizontal flip of the scene before the views
    val_size: int = field(default=5000, metadata={"min": 1})  # the last N training images form the validation split
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})  # seed of the weights, the data order, augmentation and camera dropout (torch takes 0..2^32-1)
    threads: int = field(default=0, metadata={"min": 0})  # torch CPU threads; 0 keeps torch's default
    limit_train: int = field(default=0, metadata={"min": 0})  # use only the first N training images (0 = all); for smoke runs
    limit_eval: int = field(default=0, metadata={"min": 0})  # evaluate on the first N validation/test images (0 = all)
    bf16: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16
    channels_last: bool = True  # NHWC weights and activations while training: the bf16 convolutions' fast layout (docs/BENCHMARKS.md)
    compile: bool = False  # torch.compile the training forward: faster steps after a compile of about a minute on 2 cores, so worth it for long runs only (docs/BENCHMARKS.md)
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda

    def __post_init__(self) -> None:
        check_fields(self)  # ranges, as declared on the fields
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_WIRE_DTYPE = "model"  # a role's --wire-dtype choice meaning: the code the checkpoint was trained for


def resolve_wire_dtype(choice: str, model: ModelConfig) -> str:
    """The wire code a camera sends: `choice`, or for "model" the code `model` was trained for
    (quantization-aware), int8 for a network trained without one (float32: int8 costs it about
    nothing, docs/RESULTS.md, at a quarter of the bytes)."""
    if choice != MODEL_WIRE_DTYPE:
        if choice not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be {MODEL_WIRE_DTYPE!r} or one of {WIRE_DTYPES}, got {choice!r}")
        return choice
    return "int8" if model.wire_dtype == "float32" else model.wire_dtype


def default_data_dir() -> str:
    return os.environ.get("ADA_DDNN_DATA", os.path.expanduser("~/.cache/ada-ddnn/cifar10"))


__all__ = ["ModelConfig", "TrainConfig", "default_data_dir", "MODES", "FUSIONS",
           "VIEW_MODES", "WIRE_DTYPES", "MODEL_WIRE_DTYPE", "resolve_wire_dtype"]
