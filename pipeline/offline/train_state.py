"""The state of a training run after each epoch, so that `ada-ddnn train --resume` continues it.

    runs/ada.safetensors         the checkpoint (written when the run ends)
    runs/ada.state.safetensors   this state: written atomically after every epoch

Tensors (weights and buffers, the optimizer's per-parameter state, the data generator's and
torch's RNG states) in safetensors, everything else (epoch, step, history, both configs, the
data digest, numpy's and Python's RNG states, the optimizer's hyper-parameters) as JSON in its
metadata: no pickle. Resuming restores all of it, so an interrupted run ends with the same
weights, bit for bit, as one that was never interrupted (tested). A resume whose model or
recipe differs from the state's is refused, except for `epochs` (a larger value extends a run)
and `threads`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import CheckpointError

FORMAT = "ada-ddnn-train-state/1"
RESUMABLE = ("epochs", "threads")  # TrainConfig fields a resume may change


def state_path(out_path: str) -> str:
    """`runs/ada.safetensors` -> `runs/ada.state.safetensors`."""
    return os.path.splitext(out_path)[0] + ".state.safetensors"


@dataclass
class TrainState:
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor  # state of the generator of data order, augmentation and camera dropout
    history: list[dict[str, Any]]
    wall_s: float  # training seconds spent so far, over every session
    rng: dict[str, Any] = field(default_factory=dict)  # torch, numpy and Python global RNG states
    resumed_at: list[int] = field(default_factory=list)  # epochs after which the run was resumed


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_train_state(path: str, state: TrainState, cfg: ModelConfig, tc: TrainConfig, data_digest: str) -> None:
    """Write `state` to `path` atomically (a temporary file and a rename)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    opt_state: dict[str, dict[str, Any]] = {}
    for idx, per in state.optimizer["state"].items():
        opt_state[str(idx)] = {}
        for k, v in per.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_state[str(idx)][k] = v
    tensors["rng.generator"] = state.generator
    tensors["rng.torch"] = state.rng["torch"]
    for i, s in enumerate(state.rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s.cpu()
    meta = {
        "epoch": state.epoch,
        "step": state.step,
        "wall_s": state.wall_s,
        "resumed_at": state.resumed_at,
        "history": state.history,
        "model_config": cfg.to_dict(),
        "train_config": tc.to_dict(),
        "data_digest": data_digest,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "scalars": opt_state},
        "rng": {"numpy": state.rng["numpy"], "python": state.rng["python"], "cuda": len(state.rng.get("cuda", []))},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT, "state": json.dumps(meta)})
    os.replace(tmp, path)


def load_train_state(path: str, cfg: ModelConfig, tc: TrainConfig, data_digest: str) -> TrainState:
    """The state at `path`, checked against the run that wants to continue it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no training state to resume (it is written after each epoch of a run "
                              "with --out); drop --resume to start afresh")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{path}: not a readable training state ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
    m = json.loads(meta["state"])
    _check_same_run(path, m, cfg, tc, data_digest)
    opt_state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in m["optimizer"]["scalars"].items()}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    rng = {"torch": tensors["rng.torch"], "numpy": m["rng"]["numpy"], "python": m["rng"]["python"]}
    if m["rng"]["cuda"]:
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(m["rng"]["cuda"])]
    return TrainState(
        epoch=m["epoch"], step=m["step"],
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer={"state": opt_state, "param_groups": m["optimizer"]["param_groups"]},
        generator=tensors["rng.generator"], history=m["history"], wall_s=m["wall_s"], rng=rng,
        resumed_at=m["resumed_at"],
    )


def _check_same_run(path: str, m: dict[str, Any], cfg: ModelConfig, tc: TrainConfig, data_digest: str) -> None:
    diffs = [f"model {k}: {v!r} in the state, {getattr(cfg, k)!r} now"
             for k, v in m["model_config"].items() if getattr(cfg, k, None) != v]
    diffs += [f"{k}: {v!r} in the state, {getattr(tc, k)!r} now"
              for k, v in m["train_config"].items() if k not in RESUMABLE and getattr(tc, k, None) != v]
    if m["data_digest"] != data_digest:
        diffs.append(f"data digest: {m['data_digest'][:12]} in the state, {data_digest[:12]} now")
    if diffs:
        raise CheckpointError(f"{path}: cannot resume, the run differs from the state's ({'; '.join(diffs)}); "
                              "pass the state's values (only --epochs and --threads may change) or drop --resume")
    if tc.epochs < m["epoch"]:
        raise CheckpointError(f"{path}: the state has {m['epoch']} epochs done, more than --epochs {tc.epochs}")
