"""`ada-ddnn evaluate`: the paper's experiments on the test split, thresholds chosen on validation.

    ada-ddnn evaluate --checkpoint models/ada.safetensors --baseline models/ddnn.safetensors --out reports/release/ \\
        --results docs/RESULTS.md      # a release: also rewrite the tracked results page
    ada-ddnn evaluate --checkpoint /tmp/ev/ada.safetensors --out /tmp/ev/report --limit 500 --results /tmp/ev/RESULTS.md

For each checkpoint (and the baseline): run the cameras once over the validation and test
splits (features through the wire codec, by default `--wire-dtype model`: the code the checkpoint was
trained for, int8 for one trained without a code, as deployed), choose
(T1, T2) on validation with `--policy`, then measure on test: exit rates, eq. 6/7 accuracies,
every classifier's accuracy, bytes per frame from real encoded messages, one camera missing,
n cameras missing at random, and the T1 x T2 sweep with its Pareto front. Then the camera link
(`pipeline.offline.link`): for every wire dtype (float32 down to 1-bit codes) and upload (lazy,
eager), thresholds from validation, accuracy, bytes per camera per frame by exit path, edge block
runs per 100 frames, the accuracy-vs-bytes Pareto front, and the fewest bytes at equal overall
accuracy. Writes

    OUT/report.json            the checkpoint's report (keys documented in docs/EVALUATION.md)
    OUT/optimistic.json        the paper's way: thresholds searched on the test split (optimistic)
    OUT/run.json               provenance: command, git commit, device, seed, timings
    OUT/baseline/...           the same three for --baseline
    OUT/figures/*.png          loss and accuracy per epoch, missing cameras, accuracy vs edge rate and vs bytes
    OUT/RESULTS.md             the paper's table next to ours, with the figures (also at --results PATH)

Nothing is written outside OUT unless --results names a path; then the page goes there, with its
own copy of the accuracy-vs-bytes figure in the folder `figures/` beside it (docs/figures/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import time
from typing import Any

import numpy as np
import torch

from edge.exits import CLOUD, decide
from edge.fusion import fuse
from pipeline.checkpoint import card_section, epochs_total, git_commit, load_card, read_config
from pipeline.compute import resolve_device, set_threads
from pipeline.config import MODEL_WIRE_DTYPE, default_data_dir, resolve_wire_dtype
from pipeline.data import Cifar10, Split, to_float
from pipeline.fileio import check_writable, write_json
from pipeline.offline import evaluation, link
from pipeline.offline.evaluation import CameraPass, Collected
from pipeline.offline.network import AdaDDNN, load_checkpoint
from pipeline.settings import at_least, confidence_level, env_int, fraction
from pipeline.wire.messages import DTYPES

log = logging.getLogger(__name__)

OPTIMISTIC_LABEL = "test (optimistic: searched on the test split, as the paper did)"
SITE = "eval"  # site name in the messages encoded to measure bytes (its length is part of the size)


def history_path(checkpoint: str) -> str:
    """Where `ada-ddnn train` writes the per-epoch history of `checkpoint`."""
    return os.path.splitext(checkpoint)[0] + ".history.json"


def load_history(checkpoint: str) -> list[dict] | None:
    path = history_path(checkpoint)
    if not os.path.isfile(path):
        log.warning("no training history at %s: the per-epoch figures leave this checkpoint out", path)
        return None
    with open(path) as f:
        return json.load(f)


def _metrics(c: Collected, thresholds: dict) -> dict:
    return evaluation.exit_metrics(c, thresholds["t1"], thresholds["t2"])


def missing_one(model: AdaDDNN, cams: CameraPass, thresholds: dict, device: torch.device) -> list[dict]:
    """One camera absent from every frame, for each camera in turn (the paper's Fig. 5)."""
    out = []
    n, k = len(cams), model.cfg.num_cameras
    for cam in range(k):
        present = torch.ones(n, k, dtype=torch.bool)
        present[:, cam] = False
        m = _metrics(evaluation.fuse_pass(model, cams, present, device), thresholds)
        out.append({"camera": cam, "edge": m["accuracy"]["edge"], "cloud": m["accuracy"]["cloud"],
                    "overall": m["accuracy"]["overall"], "exit_rate": m["exit_rate"]})
    return out


def absent_sets(num_cameras: int, n: int, draws: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`draws` random sets of n absent cameras: distinct while there are enough, else with repeats."""
    sets = list(itertools.combinations(range(num_cameras), n))
    idx = rng.choice(len(sets), size=draws, replace=draws > len(sets))
    return [sets[i] for i in idx]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def missing_n(model: AdaDDNN, cams: CameraPass, thresholds: dict, device: torch.device, draws: int,
              seed: int) -> list[dict]:
    """n = 1..cams cameras absent from every frame, the set drawn at random `draws` times (Fig. 6).

    overall_std is the sample standard deviation over the draws (0 for a single distinct set)."""
    rng = np.random.default_rng(seed)
    n_frames, k = len(cams), model.cfg.num_cameras
    out = []
    for n in range(1, k + 1):
        overall, edge, cloud = [], [], []
        for absent in absent_sets(k, n, draws, rng):
            present = torch.ones(n_frames, k, dtype=torch.bool)
            present[:, list(absent)] = False
            m = _metrics(evaluation.fuse_pass(model, cams, present, device), thresholds)
            overall.append(m["accuracy"]["overall"])
            edge.append(m["accuracy"]["edge"])
            cloud.append(m["accuracy"]["cloud"])
        out.append({"n": n, "overall_mean": float(np.mean(overall)),
                    "overall_std": float(np.std(overall, ddof=1)) if len(overall) > 1 else 0.0,
                    "edge_mean": _mean(edge), "cloud_mean": _mean(cloud)})
    return out


@torch.no_grad()
def bytes_per_frame(model: AdaDDNN, split: Split, cams: CameraPass, c: Collected, thresholds: dict,
                    wire_dtype: str, sample: int) -> dict:
    """Mean encoded bytes per frame over the first `sample` frames (0 = all), all cameras present.

    camera_to_edge: the CameraObservation of every camera, summed. edge_to_cloud: the Escalation
    of a frame that goes to the cloud under `thresholds`, 0 for one that leaves at the edge, so
    that it is traffic per frame. Messages carry no label (only replays do). raw_views: the six
    views as uint8 pixels."""
    from devices.views import all_views
    from pipeline.wire.messages import CameraObservation, Escalation, FeatureTensor

    n = len(cams) if sample <= 0 else min(sample, len(cams))
    decided = decide(thresholds["t1"], thresholds["t2"], c.edge_entropy[:n], c.edge_pred[:n], c.cloud_pred[:n],
                     None if c.cam_entropy is None else c.cam_entropy[:n],
                     None if c.cam_pred is None else c.cam_pred[:n], c.present[:n])
    cam_bytes = esc_bytes = raw_bytes = 0
    now = time.time()
    for start in range(0, n, 500):
        stop = min(n, start + 500)
        views = all_views(model.cfg, to_float(split.images[start:stop]))
        pixels = views.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        present = c.present[start:stop]
        fused = fuse(cams.features[start:stop], present, model.cfg.fusion)
        for i in range(stop - start):
            f = start + i
            for k in range(model.cfg.num_cameras):
                if not present[i, k]:
                    continue
                raw_bytes += len(pixels[i, k].numpy().tobytes())
                pred = None if cams.cam_pred is None else int(cams.cam_pred[f, k])
                ent = None if cams.cam_entropy is None else float(cams.cam_entropy[f, k])
                obs = CameraObservation(SITE, f, k, now, pred, ent, FeatureTensor.quantize(cams.features[f, k], wire_dtype))
                cam_bytes += len(obs.encode())
            if int(decided.exit[f]) == CLOUD:
                esc = Escalation(SITE, f, tuple(int(x) for x in present[i].nonzero().flatten()), now,
                                 FeatureTensor.quantize(fused[i], wire_dtype), float(c.edge_entropy[f]),
                                 int(c.edge_pred[f]))
                esc_bytes += len(esc.encode())
    return {"camera_to_edge": cam_bytes / n, "edge_to_cloud": esc_bytes / n, "raw_views": raw_bytes / n}


def evaluate_checkpoint(
    checkpoint: str,
    data: Cifar10,
    wire_dtype: str | None = "int8",
    policy: str = evaluation.DEFAULT_POLICY,
    min_edge_accuracy: float = evaluation.DEFAULT_MIN_EDGE_ACCURACY,
    min_edge_rate: float = evaluation.DEFAULT_MIN_EDGE_RATE,
    epsilon: float = evaluation.DEFAULT_EPSILON,
    min_exit1_rate: float = evaluation.DEFAULT_MIN_EXIT1_RATE,
    confidence: float = evaluation.DEFAULT_CONFIDENCE,
    limit: int = 0,
    draws: int = 5,
    seed: int = 0,
    bytes_sample: int = 500,
    device: str = "cpu",
    batch_size: int = 500,
    grid: tuple[float, ...] = evaluation.THRESHOLD_GRID,
) -> tuple[dict, dict, dict]:
    """(report, optimistic, run info) for one checkpoint; thresholds see the validation split only."""
    t0 = time.time()
    dev = torch.device(device)
    model = load_checkpoint(checkpoint, device=dev)
    card = load_card(checkpoint)
    val, test = data.val.head(limit), data.test.head(limit)
    policy_args = dict(policy=policy, min_edge_accuracy=min_edge_accuracy, min_edge_rate=min_edge_rate,
                       epsilon=epsilon, min_exit1_rate=min_exit1_rate, confidence=confidence)

    # The cameras run once per split; each wire dtype is the codec applied to their features.
    val_raw = evaluation.camera_pass(model, val, dev, batch_size)
    test_raw = evaluation.camera_pass(model, test, dev, batch_size)
    val_cams = link.coded(val_raw, wire_dtype)
    thresholds = evaluation.choose_thresholds(evaluation.fuse_pass(model, val_cams, device=dev, batch_size=batch_size),
                                              grid=grid, **policy_args)
    del val_cams
    log.info("%s: thresholds on %d validation frames: t1=%s t2=%s (%s)", checkpoint, len(val), thresholds["t1"],
             thresholds["t2"], thresholds["policy"])

    cams = link.coded(test_raw, wire_dtype)
    c = evaluation.fuse_pass(model, cams, device=dev, batch_size=batch_size)
    m = _metrics(c, thresholds)
    acc = evaluation.classifier_accuracies(c)
    cameras_all = acc["cameras_all"] or [None] * model.cfg.num_cameras
    points = evaluation.sweep(c, grid)
    cloud_only = evaluation.cloud_only_accuracy(c)
    report = {
        "mode": model.cfg.mode,
        "fusion": model.cfg.fusion,
        "trained_wire_dtype": model.cfg.wire_dtype,
        "epochs_total": epochs_total(card),  # of its training, stages started from others' weights included
        "checkpoint": checkpoint,
        "split": "test",
        "n": len(test),
        "thresholds": thresholds,
        "exit_rate": m["exit_rate"],
        "accuracy": {"edge": m["accuracy"]["edge"], "cloud": m["accuracy"]["cloud"],
                     "overall": m["accuracy"]["overall"], "edge_all": acc["edge_all"],
                     "cloud_all": acc["cloud_all"], "cameras_all": cameras_all},
        "bytes_per_frame": bytes_per_frame(model, test, cams, c, thresholds, wire_dtype or "float32", bytes_sample),
        "missing_one": missing_one(model, cams, thresholds, dev),
        "missing_n": missing_n(model, cams, thresholds, dev, draws, seed),
        "sweep": {"points": points, "pareto": evaluation.pareto(points)},
        "link": link.wire_ladder(model, val_raw, test_raw, policy_args, dev, batch_size, bytes_sample, grid),
    }
    # The paper's way: the same policy searched on the test split itself (optimistic).
    opt_thr = evaluation.select_thresholds(points, cloud_only=cloud_only, chosen_on=OPTIMISTIC_LABEL, **policy_args)
    om = _metrics(c, opt_thr)
    optimistic = {"mode": model.cfg.mode, "checkpoint": checkpoint, "split": "test", "n": len(test),
                  "thresholds": opt_thr, "exit_rate": om["exit_rate"],
                  "accuracy": {k: om["accuracy"][k] for k in ("edge", "cloud", "overall")}}
    run = {
        "command": sys.argv,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "wire_dtype": wire_dtype,
        "policy": policy_args,
        "limit": limit,
        "validation_frames": len(val),
        "draws": draws,
        "seed": seed,
        "bytes_sample": min(bytes_sample, len(test)) if bytes_sample > 0 else len(test),
        "data_digest_sha256": data.digest,
        "checkpoint_card": {k: card.get(k) for k in ("epochs", "seed", "device", "wall_time_s", "git_commit", "data")},
        "seconds": round(time.time() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),  # UTC
    }
    log.info("%s: test overall %.4f, edge %s at rate %.3f, cloud-only %.4f (%.0fs)", checkpoint,
             m["accuracy"]["overall"], "-" if m["accuracy"]["edge"] is None else f"{m['accuracy']['edge']:.4f}",
             m["edge_rate"], cloud_only, run["seconds"])
    return rounded(report), rounded(optimistic), run


def rounded(obj: Any, digits: int = 6) -> Any:
    """`obj` with every float rounded to `digits` decimals (1e-6 is far below one frame in 10,000),
    so that float32 means do not print as 0.38100001215934753."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def saved_entry(folder: str, ckpt: str) -> dict[str, Any]:
    """The page entry of a checkpoint from the reports an earlier run wrote into `folder`
    (`evaluate --from-reports`); ValueError when they are missing or of another checkpoint."""
    out = {}
    for name in ("report", "optimistic", "run"):
        path = os.path.join(folder, f"{name}.json")
        try:
            with open(path) as f:
                out[name] = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"--from-reports: cannot read {path} ({err}); run evaluate without it first") from err
    if os.path.normpath(out["report"].get("checkpoint", "")) != os.path.normpath(ckpt):
        raise ValueError(f"--from-reports: {folder}/report.json is of {out['report'].get('checkpoint')!r}, not {ckpt!r}: "
                         "pass the checkpoints in the order of the run that wrote the reports")
    # a run from before `finished_at` was recorded: when its run.json was written
    out["run"].setdefault("finished_at", time.strftime("%Y-%m-%d %H:%M", time.gmtime(
        os.path.getmtime(os.path.join(folder, "run.json")))))
    return {**out, "history": load_history(ckpt), "card": load_card(ckpt), "from_reports": True}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.data import load_cifar10
    from pipeline.offline.figures import write_figures
    from pipeline.offline.results_page import write_results

    if not args.out.strip():
        raise ValueError("--out: the report folder, got ''")
    if args.wire_dtype not in (MODEL_WIRE_DTYPE, *DTYPES, "none"):  # argparse checks a flag, not an env default
        raise ValueError(f"ADA_DDNN_WIRE_DTYPE={args.wire_dtype!r}: one of {(MODEL_WIRE_DTYPE, *DTYPES, 'none')}")
    set_threads(env_int("threads", 0) if args.threads is None else args.threads)
    device = str(resolve_device(args.device))
    runs = [("", args.checkpoint)] + ([("baseline", args.baseline)] if args.baseline else []) \
        + [(f"also{i}", ckpt) for i, ckpt in enumerate(args.also)]
    if args.results and not args.results.endswith(".md"):  # never a checkpoint, card, report or figure
        raise ValueError(f"--results: the results page, a Markdown file (.md), got {args.results!r}")
    if not args.from_reports:  # every checkpoint readable and the report folder writable, before the first minutes
        for _, ckpt in runs:
            read_config(ckpt)
        check_writable(os.path.join(args.out, "report.json"))
        if args.results:
            check_writable(args.results)
    entries = []
    data_by_val: dict[int, Cifar10] = {}
    for sub, ckpt in runs:
        if args.from_reports:
            entries.append(saved_entry(os.path.join(args.out, sub), ckpt))
            continue
        # The validation split must be the one training held out: its size comes from the model card.
        val_size = int(card_section(load_card(ckpt), "train_config", ckpt).get("val_size", args.val_size))
        if val_size not in data_by_val:
            data_by_val[val_size] = load_cifar10(args.data, val_size=val_size)
        wire = None if args.wire_dtype == "none" else resolve_wire_dtype(args.wire_dtype, read_config(ckpt))
        report, optimistic, run = evaluate_checkpoint(
            ckpt, data_by_val[val_size], wire_dtype=wire, policy=args.policy, min_edge_accuracy=args.min_edge_accuracy,
            min_edge_rate=args.min_edge_rate, epsilon=args.epsilon, min_exit1_rate=args.min_exit1_rate,
            confidence=args.confidence, limit=args.limit, draws=args.draws, seed=args.seed,
            bytes_sample=args.bytes_sample, device=device, batch_size=args.batch_size)
        folder = os.path.join(args.out, sub)
        write_json(os.path.join(folder, "report.json"), report, indent=1)
        write_json(os.path.join(folder, "optimistic.json"), optimistic, indent=1)
        write_json(os.path.join(folder, "run.json"), run, indent=1)
        log.info("wrote %s", os.path.join(folder, "report.json"))
        entries.append({"report": report, "optimistic": optimistic, "run": run, "history": load_history(ckpt),
                        "card": load_card(ckpt)})
    figures = write_figures(entries[:2], os.path.join(args.out, "figures"))  # the checkpoint and its baseline
    written = [os.path.join(args.out, "RESULTS.md")] + ([args.results] if args.results else [])
    for path in written:
        page_figures = dict(figures)
        if path == args.results and "bytes_pareto" in figures:  # the page's own copy, beside it (docs/figures/)
            copy = os.path.join(os.path.dirname(os.path.abspath(path)), "figures", "bytes_pareto.png")
            if os.path.abspath(copy) != os.path.abspath(figures["bytes_pareto"]):
                os.makedirs(os.path.dirname(copy), exist_ok=True)
                shutil.copyfile(figures["bytes_pareto"], copy)
            page_figures["bytes_pareto"] = copy
        write_results(path, entries, page_figures)
    print(json.dumps({"reports": [os.path.join(args.out, sub, "report.json") for sub, _ in runs],
                      "figures": figures, "results": written}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `evaluate` sub-command to the `ada-ddnn` parser."""
    p = subparsers.add_parser(
        "evaluate", help="the paper's experiments on the test split, thresholds chosen on validation",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate (.safetensors)")
    p.add_argument("--baseline", help="a second checkpoint (the DDNN baseline), reported side by side")
    p.add_argument("--out", required=True, help="report folder, e.g. reports/release/")
    p.add_argument("--data", default=default_data_dir(),
                   help="folder holding cifar-10-batches-py/ (env ADA_DDNN_DATA; default %(default)s)")
    p.add_argument("--val-size", type=at_least(1), default=5000,
                   help="validation frames when the model card does not record them (default %(default)s)")
    p.add_argument("--limit", type=at_least(0), default=0, help="first N validation and N test frames only (0 = all)")
    p.add_argument("--wire-dtype", choices=(MODEL_WIRE_DTYPE, *DTYPES, "none"),
                   default=os.environ.get("ADA_DDNN_WIRE_DTYPE", MODEL_WIRE_DTYPE),
                   help="codec the camera features go through before fusion, as deployed; 'model' is the one each "
                        "checkpoint was trained for (int8 if none), 'none' skips the codec (env "
                        "ADA_DDNN_WIRE_DTYPE; default %(default)s)")
    p.add_argument("--policy", choices=evaluation.POLICIES, default=evaluation.DEFAULT_POLICY,
                   help="threshold policy on validation: edge-accuracy = most frames at the edge with edge accuracy "
                        ">= --min-edge-accuracy and >= --min-exit1-rate at exit 1 (the model card's); exit1-first = "
                        "most frames at exit 1 with edge accuracy >= --min-edge-accuracy and overall accuracy >= "
                        "cloud-only - --epsilon; min-edge-rate = best overall accuracy with >= --min-edge-rate at "
                        "the edge; within-cloud = most frames at the edge with overall accuracy >= cloud-only - "
                        "--epsilon (default %(default)s)")
    p.add_argument("--min-edge-accuracy", type=fraction, default=evaluation.DEFAULT_MIN_EDGE_ACCURACY,
                   help="fraction, for --policy edge-accuracy and exit1-first (default %(default)s)")
    p.add_argument("--confidence", type=confidence_level, default=evaluation.DEFAULT_CONFIDENCE,
                   help="the edge accuracy floor of edge-accuracy and exit1-first must hold for the one-sided "
                        "lower confidence bound (Wilson) of the validation edge accuracy at this level; 0 = for "
                        "the validation estimate itself (default %(default)s)")
    p.add_argument("--min-exit1-rate", type=fraction, default=evaluation.DEFAULT_MIN_EXIT1_RATE,
                   help="fraction of frames at exit 1, for --policy edge-accuracy with camera classifiers; "
                        "dropped when no threshold pair reaches it (default %(default)s)")
    p.add_argument("--min-edge-rate", type=fraction, default=evaluation.DEFAULT_MIN_EDGE_RATE,
                   help="fraction of frames, for --policy min-edge-rate (default %(default)s)")
    p.add_argument("--epsilon", type=fraction, default=evaluation.DEFAULT_EPSILON,
                   help="absolute accuracy, for --policy exit1-first and within-cloud (default %(default)s)")
    p.add_argument("--draws", type=at_least(1), default=5, help="random camera sets per n for missing_n (default %(default)s)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the missing_n draws")
    p.add_argument("--bytes-sample", type=at_least(0), default=500,
                   help="test frames whose messages are encoded for bytes_per_frame (0 = all; default %(default)s)")
    p.add_argument("--also", nargs="+", default=[], metavar="CHECKPOINT",
                   help="more checkpoints, e.g. the same recipe with --fusion max: evaluated the same way, rows "
                        "of the page's tables (not of its figures); those with the first checkpoint's fusion are "
                        "pooled with it and the baseline, by mode, in the link comparison; reports in "
                        "OUT/also0/, OUT/also1/, ...")
    p.add_argument("--from-reports", action="store_true",
                   help="measure nothing: write the page and figures again from the reports an earlier run with "
                        "the same checkpoints wrote under --out")
    p.add_argument("--results", default="",
                   help="also write the results page here, e.g. docs/RESULTS.md for a release (default: only "
                        "OUT/RESULTS.md)")
    p.add_argument("--device", default=os.environ.get("ADA_DDNN_DEVICE", "auto"),
                   help="auto, cpu, cuda (env ADA_DDNN_DEVICE; default %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=500, help="frames per forward pass")
    p.add_argument("--threads", type=at_least(0), default=None,
                   help="torch CPU threads, 0 = torch's default (env ADA_DDNN_THREADS; default 0)")
    p.set_defaults(func=cmd_evaluate)
    return p
