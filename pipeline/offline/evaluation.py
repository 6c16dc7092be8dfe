"""Offline inference over a split, per-exit metrics and threshold selection on validation.

`collect` runs the whole network once over a split and keeps what every exit needs (entropies
and predictions of each camera, the edge and the cloud), so thresholds can be swept without
running the network again. `camera_pass` + `fuse_pass` split that run in two, so that the
missing-camera experiments run the cameras once and only re-fuse (the cameras do not depend on
each other); `wire_dtype` sends the camera features through the wire codec first, as deployed.

Threshold policies work on a sweep of (T1, T2) points (`sweep`, `select_thresholds`);
`choose_thresholds` is the one entry point that picks deployed thresholds, and it is given
validation outputs only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from edge.exits import CLOUD, EXIT1, EXIT2, decide, exit1_choice, under
from edge.fusion import fuse
from pipeline.config import ModelConfig
from pipeline.data import Split, to_float
from pipeline.entropy import normalized_entropy
from pipeline.layers import forward_rows
from pipeline.offline.network import AdaDDNN, prepare_views

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
    edge_loss: float | None = None  # mean cross-entropy of the edge classifier over the split
    cloud_loss: float | None = None  # and of the cloud's

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CameraPass:
    """What the cameras produce over a split (CPU tensors): enough to fuse any subset of them later."""

    labels: torch.Tensor  # N
    features: torch.Tensor  # N x cams x K x S x S, after the wire codec when one was applied
    cam_entropy: torch.Tensor | None  # N x cams (ADA only)
    cam_pred: torch.Tensor | None  # N x cams (ADA only)
    wire_dtype: str | None  # codec the features went through; None = straight from the network

    def __len__(self) -> int:
        return len(self.labels)


def _codec(x: torch.Tensor, wire_dtype: str | None) -> torch.Tensor:
    """N x K x S x S features after `pipeline.wire.messages.quantize_roundtrip`; None: unchanged."""
    if wire_dtype is None:
        return x
    from pipeline.wire.messages import (
        quantize_roundtrip,  # the wire codec; imported only when asked for
    )

    return quantize_roundtrip(x.float(), wire_dtype).to(x.device)


def wire_roundtrip(features: torch.Tensor, wire_dtype: str | None) -> torch.Tensor:
    """N x cams x K x S x S camera features as the edge receives them: each camera's tensor
    quantized with `pipeline.wire.messages.quantize_roundtrip`; None returns them unchanged."""
    if wire_dtype is None:
        return features
    n, cams = features.shape[:2]
    return _codec(features.reshape(n * cams, *features.shape[2:]), wire_dtype).reshape(features.shape)


@torch.no_grad()
def camera_pass(
    model: AdaDDNN,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    autocast: bool = False,
    wire_dtype: str | None = None,
) -> CameraPass:
    """Run the six camera modules over `split`; features optionally through the wire codec."""
    cfg: ModelConfig = model.cfg
    model.eval()
    dev = torch.device(device)
    feats, ents, preds = [], [], []
    for start in range(0, len(split), batch_size):
        scenes = to_float(split.images[start:start + batch_size], dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            f, logits = forward_rows(model.run_cameras, prepare_views(cfg, scenes))
        feats.append(wire_roundtrip(f, wire_dtype).cpu())
        if logits is not None:
            ents.append(normalized_entropy(logits).cpu())
            preds.append(logits.argmax(-1).cpu())
    return CameraPass(
        labels=torch.as_tensor(split.labels[:len(split)]),
        features=torch.cat(feats),
        cam_entropy=torch.cat(ents) if ents else None,
        cam_pred=torch.cat(preds) if preds else None,
        wire_dtype=wire_dtype,
    )


@torch.no_grad()
def fuse_pass(
    model: AdaDDNN,
    cams: CameraPass,
    present: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    autocast: bool = False,
) -> Collected:
    """Fusion, edge and cloud on the cameras' output; `present` (N x cams bool) masks cameras out.

    When the cameras' features went through the wire codec, so do the fused features the cloud
    sees: the edge escalates them in the same dtype (for concat fusion int8 re-quantization is
    lossless up to float rounding, since each fused channel is one camera's channel)."""
    model.eval()
    n = len(cams)
    if present is None:
        present = torch.ones(n, model.cfg.num_cameras, dtype=torch.bool)
    dev = torch.device(device)
    ee, ep, cl = [], [], []
    loss_e = loss_c = 0.0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            fused = fuse(cams.features[start:stop].to(dev), present[start:stop].to(dev), model.cfg.fusion)
            edge_logits = forward_rows(model.edge, fused)
            cloud_logits = forward_rows(model.cloud, _codec(fused, cams.wire_dtype))
        y = cams.labels[start:stop].to(dev)
        loss_e += float(torch.nn.functional.cross_entropy(edge_logits.float(), y, reduction="sum"))
        loss_c += float(torch.nn.functional.cross_entropy(cloud_logits.float(), y, reduction="sum"))
        ee.append(normalized_entropy(edge_logits).cpu())
        ep.append(edge_logits.argmax(-1).cpu())
        cl.append(cloud_logits.argmax(-1).cpu())
    return Collected(
        labels=cams.labels,
        present=present.cpu(),
        cam_entropy=cams.cam_entropy,
        cam_pred=cams.cam_pred,
        edge_entropy=torch.cat(ee),
        edge_pred=torch.cat(ep),
        cloud_pred=torch.cat(cl),
        edge_loss=loss_e / max(1, n),
        cloud_loss=loss_c / max(1, n),
    )


def collect(
    model: AdaDDNN,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    present: torch.Tensor | None = None,
    autocast: bool = False,
    wire_dtype: str | None = None,
) -> Collected:
    """Run the network over `split`; `present` (N x cams bool) masks cameras out, default all present.

    `wire_dtype` ("int8", "float16", "float32") passes the camera features through the wire codec
    before fusion, as the streaming pipeline does; the default (None) feeds them straight through."""
    cams = camera_pass(model, split, device, batch_size, autocast, wire_dtype)
    return fuse_pass(model, cams, present, device, batch_size, autocast)


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

POLICIES: tuple[str, ...] = ("exit1-first", "edge-accuracy", "min-edge-rate", "within-cloud")
# What model cards and `evaluate` use: edge-accuracy, the most frames at the edge while the edge
# keeps its accuracy, with a floor on exit 1. Without the floor it counts an exit-1 frame and an
# exit-2 frame as worth the same and can switch exit 1 off (it did for the release checkpoint),
# although with lazy upload an exit-1 frame costs the camera link a summary instead of features
# and runs no edge block; exit1-first maximizes exit 1 instead and gives up frames at the edge
# (docs/EVALUATION.md).
DEFAULT_POLICY = "edge-accuracy"
DEFAULT_MIN_EDGE_ACCURACY = 0.90  # edge-accuracy, exit1-first: eq. 6 accuracy the edge must keep
# edge-accuracy: fraction of frames that must leave at exit 1 (models with camera classifiers);
# 0.45 is issue 12's operating point (at edge accuracy >= 90%: >= 90% at the edge, >= 45% at exit 1)
DEFAULT_MIN_EXIT1_RATE = 0.45
DEFAULT_MIN_EDGE_RATE = 0.50  # min-edge-rate: fraction of frames that must leave at exit 1 or 2
DEFAULT_EPSILON = 0.01  # within-cloud: overall accuracy may trail cloud-only by this much (absolute)
# edge-accuracy, exit1-first: the edge accuracy floor must hold for the one-sided lower confidence
# bound (Wilson score) of the validation edge accuracy at this level, not for the point estimate:
# a floor met only just on about 4,600 validation frames at the edge (as the 42-epoch release's
# 90.16% was) fell to 89.09% on test. 0 = the point estimate (the rule before 2026-11-29).
DEFAULT_CONFIDENCE = 0.95
ALL_TO_CLOUD = " (unreachable: all to cloud)"  # the end of a policy text when no point meets the policy


def wilson_lower(accuracy: float, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of a proportion (`accuracy` of `n` trials; Wilson score
    interval): the p0 below which `accuracy` would sit z standard errors, z the normal quantile of
    `confidence` (0.5 up to, not including, 1); `confidence` 0 returns `accuracy` itself."""
    check_confidence(confidence)
    if confidence == 0:
        return accuracy
    if n <= 0:
        raise ValueError(f"a proportion of {n} trials has no confidence bound")
    return _wilson(accuracy, n, NormalDist().inv_cdf(confidence))


def check_confidence(confidence: float) -> None:
    """ValueError unless `confidence` is 0 (no bound: the estimate) or a level in 0.5..1, 1 excluded."""
    if confidence != 0 and not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence is 0 (the point estimate) or in 0.5..1 (1 excluded), got {confidence}")


def _wilson(p: float, n: int, z: float) -> float:
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


def sweep(c: Collected, grid: tuple[float, ...] = THRESHOLD_GRID) -> list[dict]:
    """Exit metrics over the T1 x T2 grid (T2 only when there are no camera classifiers), T1 outer.

    Each point: {"t1", "t2", "edge_rate", "exit1_rate", "edge_n", "edge_acc", "overall"}; edge_n
    counts the frames leaving at the edge, edge_acc is None when there is none. The same rule as
    `exit_metrics` (edge.exits' `under` and `exit1_choice`), counted for the whole grid at once
    with 0/1 matrix products instead of one `decide` per point."""
    n = len(c)
    y = c.labels
    fire2 = np.stack([under(c.edge_entropy.float(), t).numpy() for t in grid]).astype(np.int64)  # G2 x N
    ok2 = (c.edge_pred == y).numpy().astype(np.int64)
    ok_cloud = (c.cloud_pred == y).numpy().astype(np.int64)
    if c.cam_entropy is not None:
        t1s: tuple[float | None, ...] = grid
        best, cam = exit1_choice(c.cam_entropy, c.present)
        pred1 = c.cam_pred.gather(1, cam.clamp_min(0)[:, None])[:, 0]
        ok1 = ((pred1 == y) & (cam >= 0)).numpy().astype(np.int64)
        fire1 = np.stack([(under(best, t) & (cam >= 0)).numpy() for t in grid]).astype(np.int64)  # G1 x N
    else:
        t1s = (None,)
        ok1 = np.zeros(n, dtype=np.int64)
        fire1 = np.zeros((1, n), dtype=np.int64)
    rest = 1 - fire1  # frames exit 1 did not take
    at_edge = fire1.sum(1)[:, None] + rest @ fire2.T  # G1 x G2 frames leaving at exit 1 or 2
    edge_ok = (fire1 @ ok1)[:, None] + rest @ (fire2 * ok2).T
    cloud_ok = rest @ ((1 - fire2) * ok_cloud).T
    points = []
    for i, t1 in enumerate(t1s):
        for j, t2 in enumerate(grid):
            k = int(at_edge[i, j])
            points.append({"t1": None if t1 is None else float(t1), "t2": float(t2), "edge_rate": k / n,
                           "exit1_rate": int(fire1[i].sum()) / n, "edge_n": k,
                           "edge_acc": int(edge_ok[i, j]) / k if k else None,
                           "overall": int(edge_ok[i, j] + cloud_ok[i, j]) / n})
    return points


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both edge_rate and overall (>= on both, > on one),
    one per distinct (edge_rate, overall) pair (the first in sweep order), by rising edge_rate."""
    front: list[dict] = []  # its last point holds the best overall of the points visited so far
    for p in sorted(points, key=lambda q: (-q["edge_rate"], -q["overall"])):  # stable: sweep order on ties
        if not front or p["overall"] > front[-1]["overall"]:
            front.append(p)
    return front[::-1]


def _first_best(points: list[dict], ok, key) -> dict | None:
    best = None
    for p in points:  # strict '>' keeps the first point of a tie in sweep order
        if ok(p) and (best is None or key(p) > key(best)):
            best = p
    return best


def check_fraction(name: str, value: float) -> None:
    """ValueError naming `name` unless `value` is a fraction in 0..1 (a policy's floors and rates)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a fraction in 0..1, got {value}")


def select_thresholds(
    points: list[dict],
    policy: str = DEFAULT_POLICY,
    min_edge_accuracy: float = DEFAULT_MIN_EDGE_ACCURACY,
    min_edge_rate: float = DEFAULT_MIN_EDGE_RATE,
    epsilon: float = DEFAULT_EPSILON,
    cloud_only: float | None = None,
    chosen_on: str = "validation",
    min_exit1_rate: float = DEFAULT_MIN_EXIT1_RATE,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """Pick (T1, T2) from sweep points of one split; returns {"t1", "t2", "chosen_on", "policy"}.

    "Edge accuracy >= min_edge_accuracy" below means its one-sided lower confidence bound at
    `confidence` (`wilson_lower` over the point's edge_n frames) is; confidence 0: the split's
    edge accuracy itself (then points need no edge_n).

    edge-accuracy: the most frames at the edge with eq. 6 edge accuracy >= min_edge_accuracy and
                   at least min_exit1_rate of frames at exit 1 (with camera classifiers), ties to
                   the higher overall accuracy; no point reaches the exit-1 floor: the same without
                   it (the floor is a cost bound, the accuracy floor a promise); no point reaches
                   the accuracy floor: everything to the cloud.
    exit1-first:   the most frames at exit 1 with eq. 6 edge accuracy >= min_edge_accuracy and
                   overall accuracy >= cloud_only - epsilon; ties to the most frames at the edge,
                   then the higher overall (without camera classifiers: the most frames at the
                   edge under the same two floors); unreachable: everything to the cloud.
    min-edge-rate: the best overall accuracy with edge rate >= min_edge_rate, ties to the higher
                   edge rate (always reachable: T = 1 sends every frame out at the edge).
    within-cloud:  the most frames at the edge with overall accuracy >= cloud_only - epsilon,
                   where cloud_only is the cloud's accuracy on every frame of the same split;
                   ties to the higher overall (always reachable: T = 0 is cloud-only)."""
    if not points:
        raise ValueError("no sweep points to choose from")
    check_fraction("min_exit1_rate", min_exit1_rate)
    check_fraction("epsilon", epsilon)
    check_confidence(confidence)
    has_cams = points[0]["t1"] is not None
    floor_text = f"edge accuracy >= {min_edge_accuracy:.2f}" + (
        f" ({100 * confidence:g}% lower bound)" if confidence else "")

    def accurate_enough(p: dict) -> bool:
        if p["edge_acc"] is None:
            return False
        if confidence and "edge_n" not in p:
            raise ValueError("sweep points without edge_n carry no confidence bound; pass confidence=0")
        return wilson_lower(p["edge_acc"], p.get("edge_n", 0), confidence) >= min_edge_accuracy

    if policy == "exit1-first":
        if cloud_only is None:
            raise ValueError("policy 'exit1-first' needs the cloud-only accuracy")
        text = f"max exit-1 rate with {floor_text} and overall accuracy >= cloud-only {cloud_only:.4f} - {epsilon:.3f}"
        best = _first_best(points, lambda p: accurate_enough(p) and p["overall"] >= cloud_only - epsilon - 1e-12,
                           lambda p: (p.get("exit1_rate", 0.0), p["edge_rate"], p["overall"]))
    elif policy == "edge-accuracy":
        text = f"max edge rate with {floor_text}"
        accurate = [p for p in points if accurate_enough(p)]
        best = None
        if has_cams and min_exit1_rate > 0:
            text += f" and exit-1 rate >= {min_exit1_rate:.2f}"
            best = _first_best(accurate, lambda p: p["exit1_rate"] >= min_exit1_rate - 1e-12,
                               lambda p: (p["edge_rate"], p["overall"]))
            if best is None and accurate:
                text += " (exit-1 floor unreachable: without it)"
        if best is None:
            best = _first_best(accurate, lambda p: True, lambda p: (p["edge_rate"], p["overall"]))
    elif policy == "min-edge-rate":
        text = f"max overall accuracy with edge rate >= {min_edge_rate:.2f}"
        best = _first_best(points, lambda p: p["edge_rate"] >= min_edge_rate - 1e-12,
                           lambda p: (p["overall"], p["edge_rate"]))
    elif policy == "within-cloud":
        if cloud_only is None:
            raise ValueError("policy 'within-cloud' needs the cloud-only accuracy")
        text = f"max edge rate with overall accuracy >= cloud-only {cloud_only:.4f} - {epsilon:.3f}"
        best = _first_best(points, lambda p: p["overall"] >= cloud_only - epsilon - 1e-12,
                           lambda p: (p["edge_rate"], p["overall"]))
    else:
        raise ValueError(f"unknown policy {policy!r}; use one of {POLICIES}")
    if best is None:  # nothing reaches the bar: send everything to the cloud
        return {"t1": 0.0 if has_cams else None, "t2": 0.0, "chosen_on": chosen_on,
                "policy": text + ALL_TO_CLOUD}
    return {"t1": best["t1"], "t2": best["t2"], "chosen_on": chosen_on, "policy": text}


def choose_thresholds(
    c: Collected,
    min_edge_accuracy: float = DEFAULT_MIN_EDGE_ACCURACY,
    grid: tuple[float, ...] = THRESHOLD_GRID,
    policy: str = DEFAULT_POLICY,
    min_edge_rate: float = DEFAULT_MIN_EDGE_RATE,
    epsilon: float = DEFAULT_EPSILON,
    min_exit1_rate: float = DEFAULT_MIN_EXIT1_RATE,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict:
    """The deployed (T1, T2) by `policy` (see `select_thresholds`; default 'edge-accuracy': the
    most frames at the edge while the edge accuracy's 95% lower bound stays >= min_edge_accuracy
    and at least min_exit1_rate of the frames leave at exit 1). Call it on the validation split only."""
    chosen = select_thresholds(sweep(c, grid), policy, min_edge_accuracy, min_edge_rate, epsilon,
                               cloud_only_accuracy(c), chosen_on="validation", min_exit1_rate=min_exit1_rate,
                               confidence=confidence)
    if chosen["policy"].endswith(ALL_TO_CLOUD):
        hint = (f"; on few frames the {100 * confidence:g}% lower bound lies far under the estimate (confidence 0 "
                "compares the estimate)" if confidence and policy in ("edge-accuracy", "exit1-first") else "")
        log.warning("no thresholds on these %d validation frames meet the policy (%s): every frame goes to the "
                    "cloud%s", len(c), chosen["policy"], hint)
    return chosen


def cloud_only_accuracy(c: Collected) -> float:
    """Accuracy when every frame goes to the cloud, as an exact ratio of counts (like `sweep`'s)."""
    return int((c.cloud_pred == c.labels).sum()) / len(c)
