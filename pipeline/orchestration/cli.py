"""The `ada-ddnn` command: one entry point, a sub-command per job.

    ada-ddnn data [--download]        make sure CIFAR-10 is where --data points
    ada-ddnn train --mode ada|ddnn    joint training, writes a checkpoint + model card (--resume continues)
    ada-ddnn export --checkpoint C --parts DIR   one file per part (camera k, edge, cloud)
    ada-ddnn evaluate --checkpoint C  the paper's experiments offline (report.json, figures)
    ada-ddnn bench train [--json]     training throughput on this device
    ada-ddnn bench stream             the streaming pipeline's limits (compute, broker, edge, end to end)
    ada-ddnn camera|cameras           camera nodes: replay frames, publish over MQTT
    ada-ddnn edge                     edge aggregator (MQTT in, Redis frames, exits 1 and 2)
    ada-ddnn cloud                    cloud worker (Redis Stream consumer group)
    ada-ddnn replay                   the main job: all of the above over real brokers

Every option with an `ADA_DDNN_*` env-var fallback says so in its help. Every sub-command is a
module's `register(subparsers)`; `COMMANDS` lists them in the order of `--help`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import shlex
import signal
import sys
from typing import Callable, Sequence

from pipeline.config import ModelConfig, TrainConfig, default_data_dir
from pipeline.errors import Terminated
from pipeline.fileio import check_writable
from pipeline.settings import add_config_args, at_least, confidence_level, config_from_args, fraction

log = logging.getLogger("ada_ddnn")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=default_data_dir(),
                   help="folder holding cifar-10-batches-py/ (env ADA_DDNN_DATA; default %(default)s)")
    p.add_argument("--download", action="store_true", help="fetch the official CIFAR-10 with torchvision first")


def add_model_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p.add_argument_group("model (sizes; defaults are the release configuration)"), ModelConfig)
    add_config_args(p.add_argument_group("training recipe"), TrainConfig)


def load_data(args: argparse.Namespace, val_size: int = 5000):
    from pipeline.data import download, load_cifar10

    if getattr(args, "download", False):
        download(args.data)
    return load_cifar10(args.data, val_size=val_size)


# --- data, train, bench, export -------------------------------------------------------------

def cmd_data(args: argparse.Namespace) -> int:
    data = load_data(args)
    print(json.dumps({"path": data.path, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                      "digest_sha256": data.digest}, indent=2))
    return 0


def register_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check (or --download) the CIFAR-10 copy")
    add_data_args(p)
    p.set_defaults(func=cmd_data)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.offline.train import train

    cfg, tc = config_from_args(ModelConfig, args), config_from_args(TrainConfig, args)
    if args.resume and args.init:
        raise ValueError("--resume continues a run from its saved state, weights included; --init starts a new run "
                         "from a checkpoint's weights: give one of them")
    if args.out is not None and not args.out.strip():
        raise ValueError("--out: the checkpoint's path (.safetensors), got ''")
    out = args.out or f"runs/{cfg.mode}.safetensors"
    if not out.endswith(os.sep) and not os.path.isdir(out) and not out.endswith(".safetensors"):
        raise ValueError(f"--out {out}: the checkpoint's path must end in .safetensors (the model card goes beside it, "
                         f"as {os.path.splitext(out)[0]}.json)")
    if out.endswith(os.sep) or os.path.isdir(out):
        raise ValueError(f"--out {out}: the checkpoint's file name, not a folder (e.g. {os.path.join(out, cfg.mode)}"
                         ".safetensors)")
    check_writable(out)  # before hours of training
    data = load_data(args, tc.val_size)
    command = "ada-ddnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _, _, card = train(cfg, tc, data, out_path=out, progress=not args.no_progress, command=command,
                       resume=args.resume, init=args.init)
    print(json.dumps({"checkpoint": out, "thresholds": card["thresholds"], "test": card["test"]}, indent=2))
    return 0


def cmd_thresholds(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import card_section, load_card
    from pipeline.offline.train import retune

    card = load_card(args.checkpoint)
    data = load_data(args, int(card_section(card, "train_config", args.checkpoint).get("val_size", 5000)))
    command = "ada-ddnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    new = retune(args.checkpoint, data, args.policy, args.min_edge_accuracy, args.epsilon, command, write=args.write,
                 min_exit1_rate=args.min_exit1_rate, confidence=args.confidence)
    print(json.dumps({"checkpoint": args.checkpoint, "before": card.get("thresholds"), "thresholds": new["thresholds"],
                      "validation": new["validation"], "test": new["test"], "written": args.write}, indent=2))
    return 0


def register_thresholds(sub: argparse._SubParsersAction) -> None:
    from pipeline.offline import evaluation

    p = sub.add_parser("thresholds", help="choose a checkpoint's thresholds again on validation (--write: into its card)",
                       description="Choose T1 and T2 again on the checkpoint's validation split by a threshold policy, "
                                   "without retraining, and show what they give on validation and test; --write "
                                   "puts them in the model card, which the edge and replay read (the thresholds they "
                                   "replace are kept in the card's 'retuned').")
    add_data_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint (.safetensors) with its model card beside it")
    p.add_argument("--policy", choices=evaluation.POLICIES, default=evaluation.DEFAULT_POLICY,
                   help="threshold policy (see ada-ddnn evaluate --help; default %(default)s)")
    p.add_argument("--min-edge-accuracy", type=fraction, default=evaluation.DEFAULT_MIN_EDGE_ACCURACY,
                   help="fraction, for edge-accuracy and exit1-first (default %(default)s)")
    p.add_argument("--confidence", type=confidence_level, default=evaluation.DEFAULT_CONFIDENCE,
                   help="level of the lower confidence bound the edge accuracy floor holds for; 0 = the estimate "
                        "itself (see ada-ddnn evaluate --help; default %(default)s)")
    p.add_argument("--min-exit1-rate", type=fraction, default=evaluation.DEFAULT_MIN_EXIT1_RATE,
                   help="fraction of frames at exit 1, for edge-accuracy with camera classifiers; dropped when "
                        "no threshold pair reaches it (default %(default)s)")
    p.add_argument("--epsilon", type=fraction, default=evaluation.DEFAULT_EPSILON,
                   help="absolute accuracy, for exit1-first and within-cloud (default %(default)s)")
    p.add_argument("--write", action="store_true", help="rewrite the model card with the new thresholds")
    p.set_defaults(func=cmd_thresholds)


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train ADA-DDNN or DDNN jointly and write a checkpoint")
    add_data_args(p)
    add_model_train_args(p)
    p.add_argument("--out", help="checkpoint path (.safetensors); default runs/<mode>.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs each epoch still)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose state is next to --out (<out>.state.safetensors, written after "
                        "every epoch); same options, except a larger --epochs extends a finished run")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same network; --wire-dtype may differ, to fine-tune "
                        "it for other codes) with a fresh optimizer and schedule; the card names it")
    p.set_defaults(func=cmd_train)


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.offline.bench import bench_train

    result = bench_train(config_from_args(ModelConfig, args), config_from_args(TrainConfig, args), steps=args.steps,
                         warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bsub.add_parser("train", help="training samples/s and seconds per epoch on this device")
    add_model_train_args(b)
    b.add_argument("--steps", type=at_least(1), default=10, help="timed steps")
    b.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    from pipeline.orchestration.bench_stream import StreamBenchConfig

    st = bsub.add_parser("stream", help="the streaming pipeline's limits: compute, broker, edge capacity, end to "
                         "end, scaling (JSON, PNG, docs page)", description=bench_doc("bench_stream"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(st, StreamBenchConfig)
    st.add_argument("--json", dest="json_out", default="runs/bench_stream.json", help="where the JSON goes")
    st.add_argument("--png", default="", help="also draw the edge's capacity and latency here")
    st.add_argument("--doc", default="", help="also write the benchmarks page here (docs/BENCHMARKS.md)")
    st.set_defaults(func=cmd_bench_stream)
    from pipeline.orchestration.bench_broker import BrokerBenchConfig

    bb = bsub.add_parser("broker", help="the pipeline against Mosquitto containers of several configurations "
                         "(JSON, docs table)", description=bench_doc("bench_broker"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(bb, BrokerBenchConfig)
    bb.add_argument("--json", dest="json_out", default="runs/bench_broker.json", help="where the JSON goes")
    bb.add_argument("--doc", default="", help="also put the table into this page (docs/BENCHMARKS.md)")
    bb.set_defaults(func=cmd_bench_broker)
    # Its own argument parser (python -m pipeline.orchestration.bench_scale): `main` hands it the rest.
    bsub.add_parser("scale", help="what one Redis shard and one cloud worker carry (docs/SCALING.md); "
                    "see ada-ddnn bench scale --help")


def cmd_bench_broker(args: argparse.Namespace) -> int:
    from pipeline.fileio import write_json
    from pipeline.orchestration.bench_broker import (
        BrokerBenchConfig,
        bench_broker,
        section,
        table,
        write_section,
    )

    command = "ada-ddnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = config_from_args(BrokerBenchConfig, args)
    for path in (args.json_out, args.doc):
        if path:
            check_writable(path)  # before the measuring, not after it
    result = bench_broker(cfg)
    result["command"] = command
    write_json(args.json_out, result)
    if args.doc:
        write_section(args.doc, section(result, command))
    print(table(result))
    return 0


def bench_doc(module: str) -> str:
    """The docstring of a benchmark module (pipeline.orchestration.MODULE): its command's --help."""
    import importlib

    return importlib.import_module(f"pipeline.orchestration.{module}").__doc__ or ""


def cmd_bench_stream(args: argparse.Namespace) -> int:
    from pipeline.fileio import write_json
    from pipeline.orchestration.bench_report import write_figure, write_page
    from pipeline.orchestration.bench_stream import StreamBenchConfig, bench_stream

    command = "ada-ddnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = config_from_args(StreamBenchConfig, args)
    for path in (args.json_out, args.png, args.doc):
        if path:
            check_writable(path)  # before the measuring, not after it
    result = bench_stream(cfg)
    result["command"] = command
    write_json(args.json_out, result)
    if args.png:
        write_figure(result, args.png)
    if args.doc:
        write_page(result, args.doc, args.png or None)
    print(json.dumps(result["targets"], indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import export_parts
    from pipeline.offline.network import load_checkpoint

    if not args.parts.strip():
        raise ValueError("--parts: the folder for the part files, got ''")
    if os.path.exists(args.parts) and not os.path.isdir(args.parts):
        raise ValueError(f"--parts {args.parts}: is a file, not a folder")
    load_checkpoint(args.checkpoint)  # every weight the config asks for, of the right shape: no part written short
    written = export_parts(args.checkpoint, args.parts)
    print(json.dumps({"checkpoint": args.checkpoint, "parts": written}, indent=2))
    return 0


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="one safetensors file per part (camera k, edge, cloud) with the model card",
                       description="Write DIR/camera0.safetensors .. DIR/edge.safetensors, DIR/cloud.safetensors, "
                                   "each with the model card beside it, so each device ships only its own weights.")
    p.add_argument("--checkpoint", required=True, help="the full checkpoint (.safetensors)")
    p.add_argument("--parts", required=True, metavar="DIR", help="folder for the part files")
    p.set_defaults(func=cmd_export)


# The role modules import torch (seconds on a small CPU): named here, imported by `build_parser`
# once `main` has its SIGTERM handler in place.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None] | str, ...] = (
    register_data, register_train, register_thresholds, register_export, "pipeline.offline.experiments",
    register_bench, "devices.camera", "edge.aggregator", "cloud.worker", "pipeline.orchestration.replay",
    "pipeline.orchestration.status",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ada-ddnn", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        if isinstance(register, str):
            register = importlib.import_module(register).register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command. Ctrl-C or SIGTERM before a role's own handlers are in (while it
    imports and loads) or during a job (replay, evaluate, train) ends it through its `finally`
    blocks with one line and status 130 or 143; a running role's handlers stop it cleanly (0)."""
    from pipeline.transport.service import raise_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    ours = signal.getsignal(signal.SIGTERM) if raise_on_sigterm() else None
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as err:
        _setup_logging(False)
        stopped = isinstance(err, Terminated)
        log.warning("stopped by SIGTERM" if stopped else "interrupted")
        return 143 if stopped else 130
    finally:
        if ours is not None and signal.getsignal(signal.SIGTERM) is ours:  # a role's own stays, for its shutdown
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    lead = 0
    while argv[lead:lead + 1] in (["-v"], ["--verbose"]):
        lead += 1
    if argv[lead:lead + 2] == ["bench", "scale"]:  # a parser of its own (also `python -m ...bench_scale`)
        from pipeline.orchestration import bench_scale

        verbose = lead > 0
        run: Callable[[], int] = functools.partial(bench_scale.main, argv[lead + 2:], prog="ada-ddnn bench scale")
    else:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        run = functools.partial(args.func, args)
    _setup_logging(verbose)
    import redis

    try:
        return run()
    except (ValueError, RuntimeError, OSError, redis.RedisError) as err:
        # Named errors from the package (DataError, CheckpointError, ...) end here with one line, and so
        # does a Redis that refuses a role's start (WRONGTYPE: a key of ours overwritten; an operator's to mend).
        log.error("%s: %s", type(err).__name__, err)
        if verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
