"""The assembled ADA-DDNN (or DDNN) network: six camera modules, the edge, the cloud.

Each part lives in its tier's package (devices/, edge/, cloud/); this module only wires them
together for joint training and offline evaluation. The streaming processes never build it:
each loads only its own part of the same checkpoint (`pipeline.checkpoint.load_part`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cloud.cloud_net import CloudModule
from devices.camera_net import CameraModule
from devices.views import all_views, normalize
from edge.edge_net import EdgeModule
from edge.fusion import fuse
from pipeline.checkpoint import load_into, read_config, read_tensors, save_state
from pipeline.config import ModelConfig, TrainConfig
from pipeline.wire.messages import quantize_roundtrip


@dataclass
class Outputs:
    """Everything one forward pass yields; N frames, cams cameras, C classes."""

    camera_features: torch.Tensor  # N x cams x K x S x S, what each camera sends
    camera_logits: torch.Tensor | None  # N x cams x C (ADA only)
    present: torch.Tensor  # N x cams bool
    fused: torch.Tensor  # N x fused_channels x S x S, what the edge escalates
    edge_logits: torch.Tensor  # N x C (exit 2)
    cloud_logits: torch.Tensor  # N x C


class AdaDDNN(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cameras = nn.ModuleList([CameraModule(cfg) for _ in range(cfg.num_cameras)])
        self.edge = EdgeModule(cfg)
        self.cloud = CloudModule(cfg)

    def run_cameras(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised views N x cams x 3 x H x W -> (features N x cams x K x S x S, logits or None)."""
        feats, logits = [], []
        for k, cam in enumerate(self.cameras):
            f, lg = cam(views[:, k])
            feats.append(f)
            logits.append(lg)
        cam_logits = torch.stack(logits, dim=1) if self.cfg.has_camera_classifiers else None
        return torch.stack(feats, dim=1), cam_logits

    def forward_features(self, features: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edge and cloud on camera features: (fused, edge logits, cloud logits)."""
        fused = fuse(features, present, self.cfg.fusion)
        return fused, self.edge(fused), self.cloud(fused)

    def coded(self, x: torch.Tensor) -> torch.Tensor:
        """N x K x ... features through the wire codec of `cfg.wire_dtype` with a straight-through
        gradient; float32 (no codec) returns x itself, its dtype kept under autocast."""
        return x if self.cfg.wire_dtype == "float32" else quantize_roundtrip(x, self.cfg.wire_dtype, ste=True)

    def wire(self, features: torch.Tensor) -> torch.Tensor:
        """N x cams x K x S x S camera features as the edge receives them (each camera's tensor coded)."""
        n, cams = features.shape[:2]
        return self.coded(features.reshape(n * cams, *features.shape[2:])).reshape(features.shape)

    def forward(self, views: torch.Tensor, present: torch.Tensor | None = None) -> Outputs:
        """The whole network as trained: camera features through the wire codec (`wire`) into the
        edge, and the fused features through it again into the cloud, as the edge escalates them
        (its default escalation code is the cameras')."""
        if present is None:
            present = torch.ones(views.shape[:2], dtype=torch.bool, device=views.device)
        features, cam_logits = self.run_cameras(views)
        fused = fuse(self.wire(features), present, self.cfg.fusion)
        return Outputs(features, cam_logits, present, fused, self.edge(fused), self.cloud(self.coded(fused)))


def prepare_views(cfg: ModelConfig, scenes: torch.Tensor) -> torch.Tensor:
    """Float scenes in [0, 1] N x 3 x H x W -> normalised views N x cams x 3 x H x W."""
    return normalize(all_views(cfg, scenes))


@dataclass
class LossParts:
    total: torch.Tensor
    camera: torch.Tensor  # mean CE over present cameras (0 for DDNN)
    edge: torch.Tensor
    cloud: torch.Tensor
    distill: torch.Tensor  # the weighted distillation terms inside `total` (0 when off)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row T^2 * KL(softmax(teacher / T) || softmax(student / T)); the teacher gets no gradient.

    The T^2 keeps the gradients' scale independent of T (Hinton, Vinyals & Dean, 2015)."""
    t = temperature
    target = F.log_softmax(teacher.detach().float() / t, dim=-1)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    return (t * t) * F.kl_div(log_p, target, reduction="none", log_target=True).sum(dim=-1)


def joint_loss(out: Outputs, labels: torch.Tensor, tc: TrainConfig) -> LossParts:
    """Weighted sum of every exit's cross-entropy: w_cam * CE_cameras + w_edge * CE_edge + w_cloud * CE_cloud,
    plus, with `tc.distill` > 0, self-distillation of the cloud into the early exits:
    distill * (w_cam * KD_cameras + w_edge * KD_edge) with KD as in `distillation`.

    CE_cameras and KD_cameras average over the (frame, camera) pairs present."""
    ls = tc.label_smoothing
    edge = F.cross_entropy(out.edge_logits.float(), labels, label_smoothing=ls)
    cloud = F.cross_entropy(out.cloud_logits.float(), labels, label_smoothing=ls)
    zero = torch.zeros((), device=labels.device)
    kd_edge = distillation(out.edge_logits, out.cloud_logits, tc.distill_temperature).mean() if tc.distill else zero
    camera = kd_cam = zero
    if out.camera_logits is not None:
        n, c, k = out.camera_logits.shape
        flat = out.camera_logits.float().reshape(n * c, k)
        mask = out.present.reshape(n * c).float()
        count = mask.sum().clamp_min(1.0)
        per = F.cross_entropy(flat, labels.repeat_interleave(c), reduction="none", label_smoothing=ls)
        camera = (per * mask).sum() / count
        if tc.distill:
            kd = distillation(flat, out.cloud_logits.repeat_interleave(c, dim=0), tc.distill_temperature)
            kd_cam = (kd * mask).sum() / count
    distill = tc.distill * (tc.weight_camera * kd_cam + tc.weight_edge * kd_edge)
    total = tc.weight_camera * camera + tc.weight_edge * edge + tc.weight_cloud * cloud + distill
    return LossParts(total, camera, edge, cloud, distill)


def sample_present(n: int, cams: int, p_drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Camera dropout: each camera absent with probability p_drop, at least one present per frame."""
    present = torch.rand(n, cams, generator=generator) >= p_drop
    empty = ~present.any(dim=1)
    if empty.any():
        keep = torch.randint(0, cams, (int(empty.sum()),), generator=generator)
        present[empty.nonzero(as_tuple=True)[0], keep] = True
    return present


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_checkpoint(model: AdaDDNN, path: str, card: dict | None = None) -> None:
    """The whole network's weights and model card (see `pipeline.checkpoint.save_state`)."""
    save_state(model.state_dict(), model.cfg, path, card)


def load_checkpoint(path: str, expect: ModelConfig | None = None, device: str | torch.device = "cpu") -> AdaDDNN:
    """Build the whole network from the checkpoint's config and load every weight.

    Fails with CheckpointError when `expect` is given and differs from the stored config, or when
    the stored tensors do not match what this code builds from that config."""
    model = AdaDDNN(read_config(path, expect))
    load_into(model, read_tensors(path), path)
    return model.to(device).eval()
