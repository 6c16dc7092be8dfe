"""The camera link, measured the way a field engineer would: bytes per camera per frame.

Every number counts real encoded messages (`pipeline.wire.messages`, the streaming codec), all
of them: eager upload sends one `CameraObservation` per camera and frame; lazy upload sends a
`CameraSummary`, and for a frame that does not leave at exit 1 each camera also receives the
edge's `FeatureRequest` (published once, delivered to every camera of the site) and answers with
its `CameraFeatures`. Sizes are those of the message payloads (MQTT adds its own framing, the
same few tens of bytes a message whatever the payload). DDNN has no camera classifiers, so no
exit 1 and no summaries: it always uploads eagerly.

`wire_ladder` measures, for each wire dtype (float32 down to 1-bit codes), the accuracy with
thresholds chosen on validation by the evaluation policy, the bytes per camera per frame by exit
path for both uploads, the edge block's runs per 100 frames, the accuracy-vs-bytes Pareto front
over dtypes and the T1 x T2 grid (test split), and, for a list of overall accuracies, the fewest
bytes that reach each on validation (and what that choice gives on test): the comparison of
ADA-DDNN and DDNN at equal accuracy.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edge.exits import EXIT1, decide, exit1_choice, under
from pipeline.offline import evaluation
from pipeline.offline.evaluation import CameraPass, Collected
from pipeline.offline.network import AdaDDNN
from pipeline.wire.messages import (
    DTYPES,
    EXIT_NAMES,
    CameraFeatures,
    CameraObservation,
    CameraSummary,
    FeatureRequest,
    FeatureTensor,
    feature_nbytes,
)

SITE = "eval"  # site name in the messages encoded (its length is part of every size)
UPLOADS = ("lazy", "eager")
WIRE_LADDER = tuple(DTYPES)  # float32, float16, int8, int4, int2, int1
# Overall accuracies (fractions, reached on validation) at which the two modes are compared.
ACCURACY_TARGETS = (0.78, 0.80, 0.82, 0.84, 0.85, 0.86)
# The trade-off's thresholds add these to the policy's grid (whose first step is 0.025). Lazy
# bytes follow the exit-1 share, which is steep near 0 for confident camera classifiers: for the
# release checkpoint 29% of validation frames have a camera under 0.001 and 59% under 0.025, so on
# the policy's grid the share jumps from 0 to 59% in one step and nothing lies between.
FINE_THRESHOLDS = (0.0001, 0.0002, 0.0005, 0.001, 0.002) + tuple(round(float(x), 4) for x in np.linspace(0, 0.025, 11))


def coded(raw: CameraPass, dtype: str | None) -> CameraPass:
    """`raw` (camera features straight from the network) as the edge receives them in `dtype`:
    the same bits as `evaluation.camera_pass(..., wire_dtype=dtype)` (the codec is per frame)."""
    return CameraPass(raw.labels, evaluation.wire_roundtrip(raw.features, dtype), raw.cam_entropy, raw.cam_pred, dtype)


def message_sizes(cams: CameraPass, dtype: str, n: int) -> dict[str, np.ndarray | None]:
    """Encoded sizes for the first n frames, every camera present, no label (only replays carry
    one): summary, features and observation per frame and camera, request per frame."""
    k = cams.features.shape[1]
    now = time.time()
    out = {"summary": None if cams.cam_entropy is None else np.zeros((n, k), dtype=np.int64),
           "features": np.zeros((n, k), dtype=np.int64), "observation": np.zeros((n, k), dtype=np.int64),
           "request": np.zeros(n, dtype=np.int64)}
    for f in range(n):
        out["request"][f] = len(FeatureRequest(SITE, f, tuple(range(k))).encode())
        for cam in range(k):
            ft = FeatureTensor.quantize(cams.features[f, cam], dtype)
            pred = None if cams.cam_pred is None else int(cams.cam_pred[f, cam])
            ent = None if cams.cam_entropy is None else float(cams.cam_entropy[f, cam])
            out["observation"][f, cam] = len(CameraObservation(SITE, f, cam, now, pred, ent, ft).encode())
            out["features"][f, cam] = len(CameraFeatures(SITE, f, cam, ft).encode())
            if out["summary"] is not None:
                out["summary"][f, cam] = len(CameraSummary(SITE, f, cam, now, pred, ent).encode())
    return out


def per_camera_frame(sizes: dict, upload: str) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of a frame that leaves at exit 1, bytes of one that does not), per camera, for each
    of the measured frames: eager the observation either way; lazy the summary, plus the request
    and the features when the frame does not leave at exit 1."""
    if upload == "eager":
        b = sizes["observation"].mean(axis=1)
        return b, b
    s = sizes["summary"].mean(axis=1)
    return s, s + sizes["request"] + sizes["features"].mean(axis=1)


def bytes_by_exit(sizes: dict, upload: str, exits: torch.Tensor) -> dict[str, float | None]:
    """Mean bytes per camera per frame over the measured frames, all and by exit path (`exits`:
    the exit of each measured frame)."""
    leave1, rest = per_camera_frame(sizes, upload)
    ex = exits.numpy()
    b = np.where(ex == EXIT1, leave1, rest)
    out: dict[str, float | None] = {"all": round(float(b.mean()), 1)}
    for i, name in enumerate(EXIT_NAMES):
        m = ex == i
        out[name] = round(float(b[m].mean()), 1) if m.any() else None
    return out


def mean_bytes(sizes: dict, upload: str, exit1_rate: float) -> float:
    """Bytes per camera per frame for an exit-1 rate, from the measured frames' mean sizes."""
    leave1, rest = per_camera_frame(sizes, upload)
    return float(exit1_rate * leave1.mean() + (1 - exit1_rate) * rest.mean())


def exit1_rates(c: Collected, grid: tuple[float, ...]) -> dict[float | None, float]:
    """Share of frames leaving at exit 1 for each T1 of the grid (it does not depend on T2)."""
    if c.cam_entropy is None:
        return {None: 0.0}
    best, cam = exit1_choice(c.cam_entropy, c.present)
    return {float(t): float((under(best, t) & (cam >= 0)).float().mean()) for t in grid}


def pareto_front(points: list[dict], key: str = "bytes", acc: str = "overall") -> list[dict]:
    """The points no other beats on both fewer bytes and higher accuracy, by rising bytes."""
    front: list[dict] = []
    for p in sorted(points, key=lambda q: (q[key], -q[acc])):
        if not front or p[acc] > front[-1][acc]:
            front.append(p)
    return front


def _rounded(p: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in p.items()}


def at_accuracy(val_front: list[dict], val_overall: float) -> dict | None:
    """The fewest-bytes choice of a validation front that reaches `val_overall` on validation."""
    ok = [p for p in val_front if p["val_overall"] >= val_overall - 1e-12]
    return min(ok, key=lambda p: (p["val_bytes"], -p["val_overall"])) if ok else None


def trade_off_grid(grid: tuple[float, ...]) -> tuple[float, ...]:
    """The thresholds the trade-off (fronts, equal accuracy) sweeps: `grid` and FINE_THRESHOLDS."""
    return tuple(sorted(set(grid) | set(FINE_THRESHOLDS)))


def wire_ladder(model: AdaDDNN, val_raw: CameraPass, test_raw: CameraPass, policy_args: dict, device: torch.device,
                batch_size: int, sample: int, grid: tuple[float, ...] = evaluation.THRESHOLD_GRID,
                dtypes: tuple[str, ...] = WIRE_LADDER, targets: tuple[float, ...] = ACCURACY_TARGETS) -> dict:
    """Accuracy and bytes per camera per frame for every wire dtype and upload (module docstring).
    `sample`: test frames whose messages are encoded (0 = all). Each dtype's row has the
    thresholds the policy picks from `grid` (as model cards and `evaluate` do); the fronts and the
    equal-accuracy choices sweep `trade_off_grid(grid)`, finer near 0."""
    ada = model.cfg.has_camera_classifiers
    fine = trade_off_grid(grid)
    coarse = set(grid)
    uploads = UPLOADS if ada else ("eager",)
    n = len(test_raw) if sample <= 0 else min(sample, len(test_raw))
    rows, fronts = [], {u: [] for u in uploads}
    candidates: dict[str, list[dict]] = {u: [] for u in uploads}
    for dtype in dtypes:
        val_c = evaluation.fuse_pass(model, coded(val_raw, dtype), device=device, batch_size=batch_size)
        val_points = evaluation.sweep(val_c, fine)
        thr = evaluation.select_thresholds([p for p in val_points if p["t2"] in coarse and p["t1"] in coarse | {None}],
                                           cloud_only=evaluation.cloud_only_accuracy(val_c), **policy_args)
        cams = coded(test_raw, dtype)
        c = evaluation.fuse_pass(model, cams, device=device, batch_size=batch_size)
        m = evaluation.exit_metrics(c, thr["t1"], thr["t2"])
        d = decide(thr["t1"], thr["t2"], c.edge_entropy[:n], c.edge_pred[:n], c.cloud_pred[:n],
                   None if c.cam_entropy is None else c.cam_entropy[:n], None if c.cam_pred is None else c.cam_pred[:n],
                   c.present[:n])
        sizes = message_sizes(cams, dtype, n)
        rows.append({
            "wire_dtype": dtype,
            "thresholds": {"t1": thr["t1"], "t2": thr["t2"]},
            "exit_rate": m["exit_rate"],
            "accuracy": {k: m["accuracy"][k] for k in ("overall", "edge", "cloud")},
            "edge_runs_per_100_frames": round(100 * (1 - m["exit_rate"]["exit1"]), 2),
            "messages": {**{k: (None if v is None else round(float(v.mean()), 1)) for k, v in sizes.items()},
                         "codes": feature_nbytes(tuple(cams.features.shape[2:]), dtype)},
            "bytes_per_camera_frame": {u: bytes_by_exit(sizes, u, d.exit) if u in uploads else None for u in UPLOADS},
        })
        test_points = {(p["t1"], p["t2"]): p for p in evaluation.sweep(c, fine)}
        val_e1, test_e1 = exit1_rates(val_c, fine), exit1_rates(c, fine)
        for u in uploads:
            for vp in val_points:
                tp = test_points[(vp["t1"], vp["t2"])]
                e1 = test_e1[vp["t1"]]
                test_bytes = round(mean_bytes(sizes, u, e1), 1)
                fronts[u].append({"wire_dtype": dtype, "t1": vp["t1"], "t2": vp["t2"], "overall": tp["overall"],
                                  "bytes": test_bytes})
                candidates[u].append({"wire_dtype": dtype, "t1": vp["t1"], "t2": vp["t2"],
                                      "val_overall": vp["overall"], "val_bytes": mean_bytes(sizes, u, val_e1[vp["t1"]]),
                                      "overall": tp["overall"], "bytes": test_bytes,
                                      "edge_runs_per_100_frames": round(100 * (1 - e1), 2)})
    equal = []
    for target in targets:
        row: dict = {"target": target}
        for u in UPLOADS:
            ok = [p for p in candidates.get(u, []) if p["val_overall"] >= target - 1e-12]
            best = min(ok, key=lambda p: (p["val_bytes"], -p["val_overall"])) if ok else None
            row[u] = None if best is None else _rounded(best)
        equal.append(row)
    ref = next((r for r in rows if r["wire_dtype"] == "float32"), rows[0])
    return {
        "uploads": list(uploads),
        "default_upload": "lazy" if ada else "eager",
        "sample": n,
        "dtypes": rows,
        "reference": {"wire_dtype": ref["wire_dtype"], "upload": "eager", "overall": ref["accuracy"]["overall"]},
        "pareto": {u: pareto_front(fronts[u]) for u in uploads},
        "equal_accuracy": equal,
        # the choices no other beats on validation (fewer bytes, higher overall), with what each gives
        # on test: where another checkpoint's accuracy is met at the fewest bytes (`at_accuracy`)
        "val_front": {u: [_rounded(p) for p in pareto_front(candidates[u], key="val_bytes", acc="val_overall")]
                      for u in uploads},
    }


__all__ = ["wire_ladder", "at_accuracy", "pareto_front", "coded", "message_sizes", "bytes_by_exit", "mean_bytes",
           "exit1_rates", "trade_off_grid", "WIRE_LADDER", "FINE_THRESHOLDS", "ACCURACY_TARGETS", "UPLOADS", "SITE"]
