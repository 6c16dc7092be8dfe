"""Normalized entropy of a softmax: eta(p) = -sum_i p_i log p_i / log |C| (0 = sure, 1 = clueless)."""

from __future__ import annotations

import math

import torch


def normalized_entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Normalized entropy of softmax(logits) along `dim`, in [0, 1].

    Computed from log-softmax so that confident logits give 0 instead of NaN (0 * log 0).
    """
    num_classes = logits.shape[dim]
    if num_classes < 2:
        raise ValueError("normalized entropy needs at least two classes")
    logp = torch.log_softmax(logits.float(), dim=dim)
    h = -(logp.exp() * logp).sum(dim=dim)
    return (h / math.log(num_classes)).clamp_(0.0, 1.0)


def normalized_entropy_probs(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Same as `normalized_entropy` for probabilities (rows summing to 1)."""
    num_classes = probs.shape[dim]
    if num_classes < 2:
        raise ValueError("normalized entropy needs at least two classes")
    p = probs.float()
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-45)), torch.zeros_like(p)).sum(dim=dim)
    return (h / math.log(num_classes)).clamp_(0.0, 1.0)


def check_thresholds(t1: float | None, t2: float | None) -> None:
    """An exit threshold compares a normalized entropy: None (the model card's) or in [0, 1]
    (0: the exit never fires; 1: every frame that reaches it leaves there)."""
    for name, t in (("t1", t1), ("t2", t2)):
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} is a normalized entropy threshold in [0, 1], got {t}")
