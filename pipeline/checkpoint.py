"""Checkpoints: weights in safetensors (no pickle), a JSON model card beside them, and parts.

    models/ada.safetensors   tensors; metadata holds the format version and the ModelConfig
    models/ada.json          model card: config, mode, data digest, seed, epochs, device,
                             wall time, git commit, thresholds, validation and test metrics

The network has one part per process: `camera0` .. `camera{n-1}` (state-dict prefix
`cameras.{k}.`), `edge` (`edge.`) and `cloud` (`cloud.`). Each process loads only its part's
tensors (`load_part`), from the full checkpoint or from a part file that `export_parts` wrote
(`ada-ddnn export --parts DIR`): the same tensors under the same names, the same config, and
the part's name in the metadata, with the model card copied beside it. This module knows the
names of the parts, not the modules: each tier builds its own module and hands it here.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import CheckpointError
from pipeline.fileio import write_json

FORMAT = "ada-ddnn/1"


def card_path(weights_path: str) -> str:
    root, _ = os.path.splitext(weights_path)
    return root + ".json"


# --- parts --------------------------------------------------------------------------------

def part_names(cfg: ModelConfig) -> list[str]:
    """Every part of the network, in the order the data flows."""
    return [f"camera{k}" for k in range(cfg.num_cameras)] + ["edge", "cloud"]


def part_prefix(part: str, cfg: ModelConfig) -> str:
    """The state-dict prefix of `part` ("camera3" -> "cameras.3.")."""
    if part not in part_names(cfg):
        raise CheckpointError(f"no part {part!r}: the network has {', '.join(part_names(cfg))}")
    if part.startswith("camera"):
        return f"cameras.{int(part[len('camera'):])}."
    return f"{part}."


# --- writing --------------------------------------------------------------------------------

def save_state(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, card: dict[str, Any] | None = None,
               part: str | None = None) -> None:
    """Write tensors `state` of a network with config `cfg` to `path` (.safetensors) and its model
    card beside it, each atomically. `part` marks a file that holds one part only."""
    if card_path(path) == os.fspath(path):
        raise CheckpointError(f"{path}: a checkpoint's weights need a name of their own (.safetensors): the model card "
                              "goes beside them as <name>.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "config": cfg.to_json(), **({"part": part} if part else {})}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a part file is meant to be shipped and read by a service user
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    full_card = {"format": FORMAT, "config": cfg.to_dict(), "mode": cfg.mode, **(card or {})}
    if part:
        full_card["part"] = part
    write_json(card_path(path), full_card)


def export_parts(path: str, out_dir: str) -> list[str]:
    """One file per part of the checkpoint at `path` into `out_dir` (`camera0.safetensors`, ...,
    `edge.safetensors`, `cloud.safetensors`), each with the model card; returns their paths."""
    if read_meta(path).get("part"):
        raise CheckpointError(f"{path}: holds part {read_meta(path)['part']!r} only; export needs the full checkpoint")
    cfg = read_config(path)
    card = load_card(path)
    source = {os.path.realpath(path), os.path.realpath(card_path(path))}
    clash = [p for part in part_names(cfg) for p in (os.path.join(out_dir, f"{part}.safetensors"),
                                                     card_path(os.path.join(out_dir, f"{part}.safetensors")))
             if os.path.realpath(p) in source]
    if clash:  # each part is read from the source after the ones before it were written
        raise CheckpointError(f"{path}: exporting into {out_dir} would write over the checkpoint itself ({clash[0]}); "
                              "choose another --parts folder")
    written = []
    for part in part_names(cfg):
        state = read_tensors(path, part_prefix(part, cfg))
        out = os.path.join(out_dir, f"{part}.safetensors")
        save_state(state, cfg, out, {k: v for k, v in card.items() if k not in ("format", "config", "mode")}, part)
        written.append(out)
    return written


# --- reading --------------------------------------------------------------------------------

def read_meta(path: str) -> dict[str, str]:
    """The safetensors metadata of a checkpoint of this format."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT!r}")
    return meta


def read_config(path: str, expect: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig stored in a checkpoint, validated against this code's fields (and `expect`)."""
    meta = read_meta(path)
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its config does not match this code: {err}") from err
    if expect is not None and (diff := config_diff(expect, cfg)):
        raise CheckpointError(f"{path}: config mismatch ({', '.join(diff)})")
    return cfg


def config_diff(expect: ModelConfig, got: ModelConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields in which checkpoint config `got` differs from `expect`, but those in `ignore`,
    as "field: expected X, checkpoint has Y"."""
    a, b = expect.to_dict(), got.to_dict()
    return [f"{k}: expected {a[k]!r}, checkpoint has {b[k]!r}" for k in a if k not in ignore and a[k] != b[k]]


def read_tensors(path: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix` (all with ""); no other tensor is read."""
    with safe_open(path, framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str = "network") -> None:
    """`module.load_state_dict(state)` after checking names and shapes, with a message naming the difference."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: weights do not match the {what} this code builds from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:5]})")
    module.load_state_dict(state, strict=True)


def load_part(path: str, part: str, module: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Load part `part` ("camera3", "edge", "cloud") of the checkpoint at `path` into `module`
    (built by the tier from `read_config(path)`): only that part's tensors are read."""
    meta = read_meta(path)
    cfg = read_config(path)
    if meta.get("part") not in (None, part):
        raise CheckpointError(f"{path}: holds part {meta['part']!r}, not {part!r}")
    prefix = part_prefix(part, cfg)
    state = {k[len(prefix):]: v for k, v in read_tensors(path, prefix).items()}
    load_into(module, state, path, what=f"part {part!r}")
    return module.to(device).eval()


def load_card(path: str) -> dict[str, Any]:
    cp = card_path(path)
    if not os.path.isfile(cp):
        return {}
    try:
        with open(cp) as f:
            card = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{cp}: the model card does not read as JSON ({err})") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{cp}: the model card is a JSON {type(card).__name__}, not an object")
    return card


def card_section(card: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """The object `name` of the model card of the checkpoint at `path` ({} when absent);
    CheckpointError naming the card and the field when it is something else (a hand-edited card)."""
    section = card.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise CheckpointError(f"{card_path(path)}: the model card's {name!r} is a JSON {type(section).__name__}, not "
                              "an object")
    return section


def epochs_total(card: dict[str, Any]) -> int | None:
    """Epochs of training behind a checkpoint: its run's, plus those of the checkpoint it started
    from (`--init`), and so on back; None when a card does not say."""
    own = card.get("epochs")
    parent = card.get("initialized_from")
    if own is None or not parent:
        return own
    before = parent.get("epochs_total", parent.get("epochs"))
    return None if before is None else own + before


def thresholds(path: str, cfg: ModelConfig, t1: float | None = None,
               t2: float | None = None) -> tuple[float | None, float]:
    """The deployed (T1, T2): the given values, else the model card's. T1 is None for a network
    without camera classifiers (DDNN has no exit 1) whatever is given."""
    if t1 is None or t2 is None:
        card = load_card(path).get("thresholds") or {}
        if not isinstance(card, dict):
            raise CheckpointError(f"{card_path(path)}: 'thresholds' is not an object")
        for name, given in (("t1", t1), ("t2", t2)):
            value = card.get(name)
            if given is None and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                        or not 0.0 <= value <= 1.0):
                raise CheckpointError(f"{card_path(path)}: thresholds.{name} must be a normalized entropy in [0, 1], "
                                      f"got {value!r}")
        t1 = card.get("t1") if t1 is None else t1
        t2 = card.get("t2") if t2 is None else t2
    if t2 is None:
        where = "in its model card" if os.path.isfile(card_path(path)) else f"(no model card {card_path(path)} beside it)"
        raise CheckpointError(f"{path}: no thresholds {where}; pass --t1/--t2")
    if not cfg.has_camera_classifiers:
        return None, float(t2)
    return (0.0 if t1 is None else float(t1)), float(t2)


GIT_COMMIT_ENV = "ADA_DDNN_GIT_COMMIT"


def git_commit(cwd: str | None = None) -> str | None:
    """HEAD of the checkout this code runs from, "-dirty" appended when a tracked file differs
    from it. Code that runs from a copy of the tree without `.git` (a container image, a training
    machine that was sent the files alone) has no checkout to ask: there the commit the copy was
    made from, when its sender says so in $ADA_DDNN_GIT_COMMIT, else None."""
    where = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=5)
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass  # no git here
    return os.environ.get(GIT_COMMIT_ENV) or None
