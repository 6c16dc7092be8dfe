"""Joint training of the whole network on the weighted sum of every exit's cross-entropy.

    ada-ddnn train --mode ada  --out models/ada.safetensors
    ada-ddnn train --mode ddnn --out models/ddnn.safetensors
    ada-ddnn train --mode ada --epochs 180 --lr 0.1 --batch-size 200   # the paper's recipe
    ada-ddnn train --mode ada --out models/ada.safetensors --resume     # continue an interrupted run
    ada-ddnn train --mode ada --out models/ada.safetensors --resume --epochs 40   # extend a finished one
    ada-ddnn train --mode ada --wire-dtype int1 --init models/ada.safetensors --epochs 2 --lr 0.01 \
        --warmup-epochs 0 --out runs/ada-int1.safetensors   # fine-tune a checkpoint for 1-bit codes

SGD with Nesterov momentum, linear warm-up then cosine annealing per step, camera dropout so
the network tolerates missing cameras, bf16 autocast where the device supports it. Writes the
checkpoint, its model card and a per-epoch history (JSON) next to it, and after every epoch the
run's state (`<out>.state.safetensors`, see `pipeline.offline.train_state`) that `--resume`
continues from. `--init` starts from a trained checkpoint's weights instead of random ones (same
network; only the wire code may differ, the quantizer having no weights): fine-tuning it for
another bit width, with a fresh optimizer and schedule; the card names the checkpoint and its own
training budget (`initialized_from`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoint import (
    card_path,
    card_section,
    config_diff,
    epochs_total,
    git_commit,
    load_card,
    load_into,
    read_config,
    read_tensors,
)
from pipeline.compute import autocast_enabled, exact_float32, resolve_device, set_threads
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data import Cifar10, augment
from pipeline.errors import CheckpointError
from pipeline.fileio import write_json
from pipeline.offline.evaluation import (
    DEFAULT_CONFIDENCE,
    DEFAULT_EPSILON,
    DEFAULT_MIN_EDGE_ACCURACY,
    DEFAULT_MIN_EXIT1_RATE,
    DEFAULT_POLICY,
    Collected,
    choose_thresholds,
    classifier_accuracies,
    collect,
    exit_metrics,
)
from pipeline.offline.network import (
    AdaDDNN,
    joint_loss,
    load_checkpoint,
    parameter_count,
    prepare_views,
    sample_present,
    save_checkpoint,
)
from pipeline.offline.train_state import (
    TrainState,
    capture_rng,
    load_train_state,
    restore_rng,
    save_train_state,
    state_path,
)

log = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov,
    )


def training_model(model: AdaDDNN, tc: TrainConfig) -> tuple[AdaDDNN, Callable[..., Any]]:
    """The model in the training layout (channels last when `tc.channels_last`) and the forward
    the training steps call (compiled when `tc.compile`; validation calls the model itself)."""
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, (torch.compile(model) if tc.compile else model)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine annealing to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    train_loss_camera: float
    train_loss_edge: float
    train_loss_cloud: float
    train_loss_distill: float  # the distillation terms (0 when off)
    val_loss_edge: float
    val_loss_cloud: float
    val: dict[str, Any]
    seconds: float


def train(
    cfg: ModelConfig,
    tc: TrainConfig,
    data: Cifar10,
    out_path: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
    command: str | None = None,
    resume: bool = False,
    init: str | None = None,
) -> tuple[AdaDDNN, list[EpochStats], dict[str, Any]]:
    """Train jointly; returns the model, its history and the model card (also written when `out_path`).

    With `out_path`, the run's state is written after every epoch; `resume` continues from it
    (same config, `tc.epochs` may be larger than before). `init`: a checkpoint whose weights the
    run starts from (`initial_weights`; a resumed run has them in its state already)."""
    commit = git_commit()  # before the run: the tree may move on while it trains
    set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    device = resolve_device(tc.device)
    amp = autocast_enabled(device, tc.bf16)
    train_split = data.train.head(tc.limit_train)
    val_split = data.val.head(tc.limit_eval)
    net = AdaDDNN(cfg)
    initialized_from = initial_weights(net, init) if init else None
    model, forward = training_model(net.to(device), tc)
    opt = make_optimizer(model, tc)
    steps_per_epoch = max(1, len(train_split) // tc.batch_size)  # drop the last partial batch
    total = steps_per_epoch * tc.epochs
    warmup = int(round(tc.warmup_epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(tc.seed)
    # The training split lives where the network does (135 MB of uint8 for 45,000 scenes): on a GPU,
    # no host-to-device copy per step, and each copy from pageable memory would wait for the queue.
    images = torch.as_tensor(train_split.images).to(device)
    labels = torch.as_tensor(train_split.labels).to(device)
    history: list[EpochStats] = []
    done, step, wall_before, resumed_at = 0, 0, 0.0, []
    if resume:
        if not out_path:
            raise ValueError("resume needs the run's output path (--out), next to which its state is")
        st = load_train_state(state_path(out_path), cfg, tc, data.digest)
        model.load_state_dict(st.model)
        opt.load_state_dict(st.optimizer)
        gen.set_state(st.generator)
        restore_rng(st.rng)
        history = [EpochStats(**h) for h in st.history]
        done, step, wall_before, resumed_at = st.epoch, st.step, st.wall_s, [*st.resumed_at, st.epoch]
        log.info("resuming %s after epoch %d of %d (step %d)", state_path(out_path), done, tc.epochs, step)
    log.info("training %s: %d parameters, %d train / %d val frames, %d epochs x %d steps on %s (bf16 autocast %s, "
             "channels last %s, compile %s)", cfg.mode, parameter_count(model), len(train_split), len(val_split),
             tc.epochs, steps_per_epoch, device, *("on" if v else "off" for v in (amp, tc.channels_last, tc.compile)))
    t_start = time.time()
    for epoch in range(done + 1, tc.epochs + 1):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train_split), generator=gen).to(device)
        # Sums stay on the device until the epoch ends: reading a loss every step would make the
        # host wait for the GPU's queue to drain, step after step.
        sums = torch.zeros(5, device=device)
        correct_cloud = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.mode} epoch {epoch}/{tc.epochs}", disable=not progress,
                   unit="step", dynamic_ncols=True, leave=False)
        for i in bar:
            idx = order[i * tc.batch_size:(i + 1) * tc.batch_size]
            x = images[idx].float().div_(255.0)
            y = labels[idx]
            if tc.augment:
                x = augment(x, gen)
            present = sample_present(len(idx), cfg.num_cameras, tc.camera_dropout, gen).to(device)
            lr = lr_at(step, total, warmup, tc.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = forward(prepare_views(cfg, x), present)
                parts = joint_loss(out, y, tc)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()
            step += 1
            b = len(idx)
            sums += b * torch.stack([v.detach().float() for v in
                                     (parts.total, parts.camera, parts.edge, parts.cloud, parts.distill)])
            seen += b
            if progress:  # the bar's running accuracy, and nothing else's
                correct_cloud += (out.cloud_logits.argmax(-1) == y).sum()
            if progress and i % 10 == 0:
                bar.set_postfix(loss=f"{float(sums[0]) / seen:.3f}", cloud_acc=f"{int(correct_cloud) / seen:.3f}",
                                lr=f"{lr:.3f}")
        bar.close()
        mean = sums.double().cpu().numpy() / max(1, seen)
        col = collect(model, val_split, device, autocast=amp, wire_dtype=cfg.wire_dtype)  # one pass: accuracies and losses
        val = classifier_accuracies(col)
        stats = EpochStats(epoch, lr, *map(float, mean), col.edge_loss, col.cloud_loss, val, time.time() - t0)
        history.append(stats)
        cams = val["cameras_all"]
        log.info("epoch %d/%d: loss %.3f (cam %.3f edge %.3f cloud %.3f distill %.3f), val edge %.4f cloud %.4f "
                 "cameras %s, %.0fs", epoch, tc.epochs, mean[0], mean[1], mean[2], mean[3], mean[4],
                 val["edge_all"], val["cloud_all"], "-" if cams is None else " ".join(f"{a:.3f}" for a in cams),
                 stats.seconds)
        if out_path:
            _write_history(out_path, history)
            state = TrainState(epoch, step, model.state_dict(), opt.state_dict(), gen.get_state(),
                               [h.__dict__ for h in history], wall_before + time.time() - t_start, capture_rng(),
                               resumed_at)
            save_train_state(state_path(out_path), state, cfg, tc, data.digest)
        if on_epoch:
            on_epoch(stats)
    model = model.to(memory_format=torch.contiguous_format)  # the layout it is deployed in, for the card's metrics
    wall = wall_before + time.time() - t_start
    card = _model_card(model, tc, data, device, amp, wall, history, commit)  # metrics in float32, as deployed
    if resumed_at:
        card["resumed_after_epochs"] = resumed_at
    if initialized_from:
        card["initialized_from"] = initialized_from
        card["epochs_total"] = epochs_total(card)
    if command:
        card = {"command": command, **card}
    if out_path:
        save_checkpoint(model, out_path, card)
        log.info("wrote %s", out_path)
    return model, history, card


def initial_weights(model: AdaDDNN, path: str) -> dict[str, Any]:
    """Load the weights of the checkpoint at `path` into `model` (built from the run's config),
    for a run that starts from them; returns what the card records of that checkpoint. Its network
    must be the run's: every ModelConfig field but `wire_dtype` equal (CheckpointError naming the
    fields that differ)."""
    theirs = read_config(path)
    if diff := config_diff(model.cfg, theirs, ignore=("wire_dtype",)):
        raise CheckpointError(f"{path}: cannot start from it, its network differs from this run's ({', '.join(diff)})")
    load_into(model, read_tensors(path), path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    card = load_card(path)
    log.info("starting from the weights of %s (trained for %s codes)", path, theirs.wire_dtype)
    return {"checkpoint": path, "sha256": digest, "wire_dtype": theirs.wire_dtype, "command": card.get("command"),
            "epochs": card.get("epochs"), "wall_time_s": card.get("wall_time_s"), "git_commit": card.get("git_commit"),
            "epochs_total": epochs_total(card)}


def _write_history(out_path: str, history: list[EpochStats]) -> None:
    write_json(os.path.splitext(out_path)[0] + ".history.json", [h.__dict__ for h in history], indent=1)


def split_report(col: Collected, thresholds: dict) -> dict[str, Any]:
    """Per-exit metrics of a split's collected outputs with the given thresholds."""
    m = exit_metrics(col, thresholds["t1"], thresholds["t2"])
    return {"n": len(col), **classifier_accuracies(col), "exit_rate": m["exit_rate"], "accuracy": m["accuracy"]}


def retune(path: str, data: Cifar10, policy: str = DEFAULT_POLICY, min_edge_accuracy: float = DEFAULT_MIN_EDGE_ACCURACY,
           epsilon: float = DEFAULT_EPSILON, command: str | None = None, write: bool = False,
           min_exit1_rate: float = DEFAULT_MIN_EXIT1_RATE, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """Choose a checkpoint's deployed thresholds again, on its validation split, by `policy`
    (`evaluation.select_thresholds`), without retraining: the card's thresholds and its validation
    and test reports as training would have written them with that policy. With `write`, the card
    beside the checkpoint is rewritten, the thresholds it replaces kept in `retuned`. Returns the
    new card. `data` must hold the validation split the run held out (its `val_size`)."""
    model = load_checkpoint(path)
    card = load_card(path)
    tc = card_section(card, "train_config", path)
    if card_section(card, "data", path).get("digest_sha256") not in (None, data.digest):
        raise ValueError(f"{path} was trained on CIFAR-10 with digest {card['data']['digest_sha256']}, this copy is "
                         f"{data.digest}")
    if len(data.val) != tc.get("val_size", len(data.val)):
        raise ValueError(f"{path} held out {tc['val_size']} validation frames; load the data with that val_size")
    metrics = card_metrics(model, data, int(tc.get("limit_eval", 0)), torch.device("cpu"),
                           policy=policy, min_edge_accuracy=min_edge_accuracy, epsilon=epsilon,
                           min_exit1_rate=min_exit1_rate, confidence=confidence)
    thr = metrics["thresholds"]
    previous = {"thresholds": card.get("thresholds"), "replaced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **({"by": command} if command else {})}
    new = {**card, **metrics, "retuned": [*card.get("retuned", []), previous]}
    if write:
        write_json(card_path(path), new, indent=2)
        log.info("%s: thresholds %s -> t1=%s t2=%s (%s)", card_path(path), card.get("thresholds"), thr["t1"], thr["t2"],
                 thr["policy"])
    return new


def card_metrics(model: AdaDDNN, data: Cifar10, limit_eval: int, device: torch.device, **policy: Any) -> dict[str, Any]:
    """What a model card says of the deployed network: the thresholds chosen on validation
    (`choose_thresholds`, its default policy unless `policy` says otherwise), the wire code the
    metrics see (the one it was trained for) and the validation and test reports, float32."""
    dtype = model.cfg.wire_dtype
    with exact_float32():  # no TF32 on a GPU: the thresholds must be the ones a CPU would choose
        val_outputs = collect(model, data.val.head(limit_eval), device, wire_dtype=dtype)
        test_outputs = collect(model, data.test.head(limit_eval), device, wire_dtype=dtype)
    thresholds = choose_thresholds(val_outputs, **policy)
    return {"thresholds": thresholds, "validation": split_report(val_outputs, thresholds), "wire_dtype": dtype,
            "test": split_report(test_outputs, thresholds)}


def _model_card(model: AdaDDNN, tc: TrainConfig, data: Cifar10, device: torch.device, amp: bool,
                wall: float, history: list[EpochStats], commit: str | None) -> dict[str, Any]:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "data": {"digest_sha256": data.digest, "train": len(data.train.head(tc.limit_train)),
                 "val": len(data.val.head(tc.limit_eval)), "test": len(data.test.head(tc.limit_eval))},
        "train_config": tc.to_dict(),
        "seed": tc.seed,
        "epochs": tc.epochs,
        "device": dev_name,
        "bf16_autocast": amp,  # training only; the metrics below are computed in float32
        "wall_time_s": round(wall, 1),
        "git_commit": commit,  # HEAD when training started (the code that trained it)
        "torch": torch.__version__,
        "parameters": parameter_count(model),
        **card_metrics(model, data, tc.limit_eval, device),  # thresholds, validation, wire_dtype, test (float32 proper)
        "final_epoch": history[-1].__dict__ if history else None,
    }
