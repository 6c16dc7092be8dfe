"""Fusion of camera features with a mask of present cameras: any subset of cameras works."""

from __future__ import annotations

import torch


def fuse(features: torch.Tensor, present: torch.Tensor, how: str) -> torch.Tensor:
    """Fuse N x cams x K x S x S camera features; `present` is N x cams bool.

    max: element-wise max over present cameras; mean: mean over present cameras; concat: the
    cameras' features side by side with absent cameras zeroed (N x cams*K x S x S). A frame with
    no camera present fuses to zeros.
    """
    if features.ndim != 5:
        raise ValueError(f"features must be N x cams x K x S x S, got {tuple(features.shape)}")
    if present.shape != features.shape[:2]:
        raise ValueError(f"present mask {tuple(present.shape)} does not match features {tuple(features.shape[:2])}")
    m = present.to(features.dtype)[:, :, None, None, None]
    if how == "concat":
        n, c, k, s, _ = features.shape
        return (features * m).reshape(n, c * k, s, s)
    if how == "mean":
        count = m.sum(dim=1).clamp_min(1.0)
        return (features * m).sum(dim=1) / count
    if how == "max":
        neg = torch.finfo(features.dtype).min
        fused = features.masked_fill(~present[:, :, None, None, None], neg).amax(dim=1)
        none = ~present.any(dim=1)
        return torch.where(none[:, None, None, None], torch.zeros_like(fused), fused)
    raise ValueError(f"unknown fusion {how!r}; use max, mean or concat")
