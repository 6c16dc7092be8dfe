"""Offline inference over a split, per-exit metrics and threshold selection on validation.

`collect` runs the whole network once over a split and keeps what every exit needs (entropies
and predictions of each camera, the edge and the cloud), so thresholds can be swept without
running the network again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from edge.exits import CLOUD, EXIT1, EXIT2, decide
from pipeline.config import ModelConfig
from pipeline.data import Split, to_float
from pipeline.entropy import normalized_entropy
from pipeline.network import AdaDDNN, prepare_views

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """Per-frame outputs of every classifier over a split (CPU tensors)."""

    labels: torch.Tensor  # N
    present: torch.Tensor  # N x cams bool
    cam_entropy: torch.Tensor | None  # N x cams
    cam_pred: torch.Tensor | None  # N x cams
    edge_entropy: torch.Tensor
    edge_pred: torch.Tensor
    cloud_pred: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def collect(
    model: AdaDDNN,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    present: torch.Tensor | None = None,
    autocast: bool = False,
) -> Collected:
    """Run the network over `split`; `present` (N x cams bool) masks cameras out, default all present."""
    cfg: ModelConfig = model.cfg
    model.eval()
    n = len(split)
    if present is None:
        present = torch.ones(n, cfg.num_cameras, dtype=torch.bool)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce", "cp", "ee", "ep", "cl")}
    dev = torch.device(device)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        scenes = to_float(split.images[start:stop], dev)
        mask = present[start:stop].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(prepare_views(cfg, scenes), mask)
        if out.camera_logits is not None:
            parts["ce"].append(normalized_entropy(out.camera_logits).cpu())
            parts["cp"].append(out.camera_logits.argmax(-1).cpu())
        parts["ee"].append(normalized_entropy(out.edge_logits).cpu())
        parts["ep"].append(out.edge_logits.argmax(-1).cpu())
        parts["cl"].append(out.cloud_logits.argmax(-1).cpu())
    return Collected(
        labels=torch.as_tensor(split.labels[:n]),
        present=present.cpu(),
        cam_entropy=torch.cat(parts["ce"]) if parts["ce"] else None,
        cam_pred=torch.cat(parts["cp"]) if parts["cp"] else None,
        edge_entropy=torch.cat(parts["ee"]),
        edge_pred=torch.cat(parts["ep"]),
        cloud_pred=torch.cat(parts["cl"]),
    )


def classifier_accuracies(c: Collected) -> dict:
    """Accuracy of every classifier on every frame (camera accuracy over frames where it is present)."""
    y = c.labels
    out = {
        "edge_all": float((c.edge_pred == y).float().mean()),
        "cloud_all": float((c.cloud_pred == y).float().mean()),
    }
    if c.cam_pred is not None:
        cams = []
        for k in range(c.cam_pred.shape[1]):
            m = c.present[:, k]
            cams.append(float((c.cam_pred[m, k] == y[m]).float().mean()) if m.any() else None)
        out["cameras_all"] = cams
    else:
        out["cameras_all"] = None
    return out


def exit_metrics(c: Collected, t1: float | None, t2: float) -> dict:
    """Exit rates and accuracies (the paper's eq. 6 edge accuracy and eq. 7 cloud accuracy)."""
    d = decide(t1, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred, c.present)
    correct = d.prediction == c.labels
    n = len(c)

    def acc(mask: torch.Tensor) -> float | None:
        return float(correct[mask].float().mean()) if mask.any() else None

    at_edge = d.exit != CLOUD
    return {
        "exit_rate": {
            "exit1": float((d.exit == EXIT1).sum()) / n,
            "exit2": float((d.exit == EXIT2).sum()) / n,
            "cloud": float((d.exit == CLOUD).sum()) / n,
        },
        "accuracy": {
            "edge": acc(at_edge),
            "cloud": acc(~at_edge),
            "overall": float(correct.float().mean()),
            "exit1": acc(d.exit == EXIT1),
            "exit2": acc(d.exit == EXIT2),
        },
        "edge_rate": float(at_edge.float().mean()),
    }


THRESHOLD_GRID = tuple(round(x, 3) for x in np.linspace(0.0, 1.0, 41))


def choose_thresholds(
    c: Collected,
    min_edge_accuracy: float = 0.90,
    grid: tuple[float, ...] = THRESHOLD_GRID,
) -> dict:
    """Policy 'edge-accuracy': the (T1, T2) that send the most frames out at the edge while the
    edge accuracy stays >= min_edge_accuracy; ties go to the higher overall accuracy. Call it on
    the validation split only."""
    has_cams = c.cam_entropy is not None
    best: tuple | None = None
    for t1 in grid if has_cams else (None,):
        for t2 in grid:
            m = exit_metrics(c, t1, t2)
            edge_acc = m["accuracy"]["edge"]
            if edge_acc is None or edge_acc < min_edge_accuracy:
                continue
            key = (m["edge_rate"], m["accuracy"]["overall"])
            if best is None or key > best[0]:
                best = (key, t1, t2)
    if best is None:  # nothing reaches the bar: send everything to the cloud
        return {"t1": 0.0 if has_cams else None, "t2": 0.0, "chosen_on": "validation",
                "policy": f"max edge rate with edge accuracy >= {min_edge_accuracy:.2f} (unreachable: all to cloud)"}
    return {"t1": best[1], "t2": best[2], "chosen_on": "validation",
            "policy": f"max edge rate with edge accuracy >= {min_edge_accuracy:.2f}"}
