"""Files written whole or not at all: a reader never sees half a report or half a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` to `path` through a temporary file and a rename; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str, obj: Any, indent: int = 2) -> str:
    """`obj` as JSON (with a final newline) at `path`, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def check_writable(path: str) -> str:
    """Fail now, not after a long job, when `path` cannot be written (`atomic_write_text` creates
    missing folders, so the nearest existing one must take new files)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        if os.path.lexists(folder):  # a file (or a dangling link) where a folder is to be made
            raise OSError(f"cannot write {path}: {folder} exists and is not a folder")
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    probe = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.probe")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    if os.path.isdir(path):
        raise OSError(f"cannot write {path}: it is a folder")
    return path
