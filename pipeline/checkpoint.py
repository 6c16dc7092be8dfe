"""Checkpoints: weights in safetensors (no pickle) plus a JSON model card beside them.

    models/ada.safetensors   tensors; metadata holds the format version and the ModelConfig
    models/ada.json          model card: config, mode, data digest, seed, epochs, device,
                             wall time, git commit, thresholds, validation and test metrics
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.network import AdaDDNN

FORMAT = "ada-ddnn/1"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded into this code."""


def card_path(weights_path: str) -> str:
    root, _ = os.path.splitext(weights_path)
    return root + ".json"


def save_checkpoint(model: AdaDDNN, path: str, card: dict[str, Any] | None = None) -> None:
    """Write `path` (.safetensors) and its model card atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.cfg.to_json()}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)
    full_card = {"format": FORMAT, "config": model.cfg.to_dict(), "mode": model.cfg.mode, **(card or {})}
    tmp_card = card_path(path) + ".tmp"
    with open(tmp_card, "w") as f:
        json.dump(full_card, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp_card, card_path(path))


def read_config(path: str) -> ModelConfig:
    """The ModelConfig stored in a checkpoint, validated against this code's fields."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
    try:
        return ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its config does not match this code: {err}") from err


def load_checkpoint(path: str, expect: ModelConfig | None = None, device: str | torch.device = "cpu") -> AdaDDNN:
    """Build the network from the checkpoint's config and load its weights.

    Fails with CheckpointError when `expect` is given and differs from the stored config, or when
    the stored tensors do not match what this code builds from that config."""
    cfg = read_config(path)
    if expect is not None and expect != cfg:
        a, b = expect.to_dict(), cfg.to_dict()
        diff = ", ".join(f"{k}: expected {a[k]!r}, checkpoint has {b[k]!r}" for k in a if a[k] != b[k])
        raise CheckpointError(f"{path}: config mismatch ({diff})")
    model = AdaDDNN(cfg)
    with safe_open(path, framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: weights do not match the network this code builds from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:5]})"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_card(path: str) -> dict[str, Any]:
    cp = card_path(path)
    if not os.path.isfile(cp):
        return {}
    with open(cp) as f:
        return json.load(f)


def git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=cwd or os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
