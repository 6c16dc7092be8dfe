"""The exit rules, as pure functions on per-frame tensors (shared by offline evaluation and streaming).

Exit 1 (ADA only): the lowest normalized entropy among the cameras present is under T1; the
edge answers with that camera's class. Exit 2: the edge classifier's entropy is under T2.
Otherwise the frame goes to the cloud, which always answers.

"Under T" means entropy < T; T = 1 admits every frame (entropy never exceeds 1) and T = 0 none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXIT1, EXIT2, CLOUD = 0, 1, 2  # indices into pipeline.wire.messages.EXIT_NAMES


def under(entropy: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """entropy < threshold, with threshold >= 1 admitting everything and None admitting nothing."""
    if threshold is None:
        return torch.zeros_like(entropy, dtype=torch.bool)
    if threshold >= 1.0:
        return torch.ones_like(entropy, dtype=torch.bool)
    return entropy < threshold


def exit1_choice(cam_entropy: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest entropy among present cameras, that camera's index) per frame; N x cams inputs.

    A frame with no camera present gets entropy +inf (never exits) and camera -1. Ties go to the
    lowest camera index."""
    masked = cam_entropy.float().masked_fill(~present, float("inf"))
    best, cam = masked.min(dim=1)
    cam = torch.where(present.any(dim=1), cam, torch.full_like(cam, -1))
    return best, cam


@dataclass
class Decisions:
    exit: torch.Tensor  # N int: EXIT1, EXIT2 or CLOUD
    prediction: torch.Tensor  # N int: the class the frame leaves with
    camera: torch.Tensor  # N int: the camera that answered at exit 1, else -1


def decide(
    t1: float | None,
    t2: float,
    edge_entropy: torch.Tensor,
    edge_pred: torch.Tensor,
    cloud_pred: torch.Tensor,
    cam_entropy: torch.Tensor | None = None,
    cam_pred: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
) -> Decisions:
    """Apply exit 1 (when camera entropies are given and t1 is not None), exit 2, then the cloud."""
    n = edge_entropy.shape[0]
    exit_ = torch.full((n,), CLOUD, dtype=torch.long)
    pred = cloud_pred.long().clone()
    camera = torch.full((n,), -1, dtype=torch.long)
    taken = torch.zeros(n, dtype=torch.bool)
    if cam_entropy is not None and t1 is not None:
        if cam_pred is None or present is None:
            raise ValueError("exit 1 needs camera predictions and the present mask")
        best, cam = exit1_choice(cam_entropy, present)
        fire = under(best, t1) & (cam >= 0)
        exit_[fire] = EXIT1
        idx = fire.nonzero(as_tuple=True)[0]
        pred[idx] = cam_pred[idx, cam[idx]].long()
        camera[idx] = cam[idx]
        taken |= fire
    fire2 = under(edge_entropy.float(), t2) & ~taken
    exit_[fire2] = EXIT2
    pred[fire2] = edge_pred.long()[fire2]
    return Decisions(exit_, pred, camera)
