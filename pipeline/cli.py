"""The `ada-ddnn` command: one entry point, a sub-command per job.

    ada-ddnn data [--download]        make sure CIFAR-10 is where --data points
    ada-ddnn train --mode ada|ddnn    joint training, writes a checkpoint + model card
    ada-ddnn evaluate --checkpoint C  the paper's experiments offline (report.json, figures)
    ada-ddnn bench train [--json]     training throughput on this device
    ada-ddnn camera|cameras           camera nodes: replay frames, publish over MQTT
    ada-ddnn edge                     edge aggregator (MQTT in, Redis frames, exits 1 and 2)
    ada-ddnn cloud                    cloud worker (Redis Stream consumer group)
    ada-ddnn replay                   the main job: all of the above over real brokers

Every option that has an env-var fallback says so in its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from typing import Sequence

from pipeline.config import FUSIONS, MODES, VIEW_MODES, ModelConfig, TrainConfig, default_data_dir, env_default

log = logging.getLogger("ada_ddnn")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=default_data_dir(),
                   help="folder holding cifar-10-batches-py/ (env ADA_DDNN_DATA; default %(default)s)")
    p.add_argument("--download", action="store_true", help="fetch the official CIFAR-10 with torchvision first")


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = ModelConfig()
    g = p.add_argument_group("model (sizes; defaults are the release configuration)")
    g.add_argument("--mode", choices=MODES, default=env_default("MODE", d.mode),
                   help="ada: camera classifiers + exit 1; ddnn: the baseline (env ADA_DDNN_MODE)")
    g.add_argument("--fusion", choices=FUSIONS, default=d.fusion)
    g.add_argument("--views", dest="view_mode", choices=VIEW_MODES, default=d.view_mode)
    for name in ("camera_channels", "camera_head_channels", "camera_stem_stride", "wire_channels", "wire_size",
                 "edge_channels", "edge_blocks", "cloud_channels", "cloud_blocks"):
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name))


def model_config_from(args: argparse.Namespace) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in vars(args).items() if k in names})


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training recipe")
    g.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s; the paper uses 180")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--weight-camera", type=float, default=d.weight_camera, help="loss weight of the camera exits")
    g.add_argument("--weight-edge", type=float, default=d.weight_edge, help="loss weight of exit 2")
    g.add_argument("--weight-cloud", type=float, default=d.weight_cloud, help="loss weight of the cloud exit")
    g.add_argument("--camera-dropout", type=float, default=d.camera_dropout,
                   help="probability that a camera is absent from a training frame")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--val-size", type=int, default=d.val_size)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--threads", dest="num_threads", type=int, default=d.num_threads, help="torch CPU threads (0 = default)")
    g.add_argument("--limit-train", type=int, default=d.limit_train, help="train on the first N images only (smoke runs)")
    g.add_argument("--limit-eval", type=int, default=d.limit_eval, help="evaluate on the first N images only")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast")
    g.add_argument("--device", default=env_default("DEVICE", d.device), help="auto, cpu, cuda (env ADA_DDNN_DEVICE)")


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def load_data(args: argparse.Namespace, val_size: int = 5000):
    from pipeline.data import download, load_cifar10

    if getattr(args, "download", False):
        download(args.data)
    return load_cifar10(args.data, val_size=val_size)


def cmd_data(args: argparse.Namespace) -> int:
    data = load_data(args)
    print(json.dumps({"path": data.path, "train": len(data.train), "val": len(data.val), "test": len(data.test),
                      "digest_sha256": data.digest}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    cfg = model_config_from(args)
    tc = train_config_from(args)
    data = load_data(args, tc.val_size)
    out = args.out or f"runs/{cfg.mode}.safetensors"
    command = "ada-ddnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _, _, card = train(cfg, tc, data, out_path=out, progress=not args.no_progress, command=command)
    test = card["test"]
    print(json.dumps({"checkpoint": out, "thresholds": card["thresholds"], "test": test}, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import bench_train

    result = bench_train(model_config_from(args), train_config_from(args), steps=args.steps, warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ada-ddnn", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="check (or --download) the CIFAR-10 copy")
    add_data_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train ADA-DDNN or DDNN jointly and write a checkpoint")
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    p.add_argument("--out", help="checkpoint path (.safetensors); default runs/<mode>.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs each epoch still)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    b = bsub.add_parser("train", help="training samples/s and seconds per epoch on this device")
    add_model_args(b)
    add_train_args(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    from pipeline import evaluate
    evaluate.register(sub)
    from devices import camera
    camera.register(sub)
    from edge import aggregator
    aggregator.register(sub)
    from cloud import worker
    worker.register(sub)
    from pipeline import replay
    replay.register(sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        # Named errors from the package (DataError, CheckpointError, ...) end here with one line.
        log.error("%s: %s", type(err).__name__, err)
        if args.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
