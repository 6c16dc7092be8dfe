"""Benchmarks: `ada-ddnn bench train [--json]` measures training throughput on this device.

    ada-ddnn bench train --threads 2 --steps 30 --json                 # the training defaults
    ada-ddnn bench train --threads 2 --steps 30 --compile --json       # with torch.compile

Times `steps` full training steps (views, forward, joint loss, backward, SGD) on random frames
after `warmup` untimed ones, and reports samples/s and the seconds an epoch of the 45,000
training images would take. The warm-up's seconds are reported too: with `--compile` they are
mostly compiling, which a training run pays once (or on a warm inductor cache, hardly at all).
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch

from pipeline.compute import autocast_enabled, resolve_device, set_threads
from pipeline.config import ModelConfig, TrainConfig
from pipeline.offline.network import (
    AdaDDNN,
    joint_loss,
    parameter_count,
    prepare_views,
    sample_present,
)
from pipeline.offline.train import make_optimizer, training_model

TRAIN_IMAGES = 45_000  # CIFAR-10 training split after holding out 5,000 for validation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: ModelConfig, tc: TrainConfig, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    if steps < 1:
        raise ValueError("steps must be >= 1")
    set_threads(tc.threads)
    device = resolve_device(tc.device)
    amp = autocast_enabled(device, tc.bf16)
    torch.manual_seed(tc.seed)
    model, forward = training_model(AdaDDNN(cfg).to(device).train(), tc)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    x = torch.rand(tc.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (tc.batch_size,), generator=gen).to(device)
    present = sample_present(tc.batch_size, cfg.num_cameras, tc.camera_dropout, gen).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = joint_loss(forward(prepare_views(cfg, x), present), y, tc).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    samples_per_s = steps * tc.batch_size / elapsed
    return {
        "benchmark": "train",
        "mode": cfg.mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "bf16_autocast": amp,
        "channels_last": tc.channels_last,
        "compile": tc.compile,
        "batch_size": tc.batch_size,
        "steps": steps,
        "parameters": parameter_count(model),
        "samples_per_s": round(samples_per_s, 1),
        "seconds_per_step": round(elapsed / steps, 4),
        "seconds_per_epoch": round(TRAIN_IMAGES / samples_per_s, 1),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 1),  # with compile: mostly the compile
        "torch": torch.__version__,
    }
