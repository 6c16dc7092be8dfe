"""Files written whole or not at all: a reader never sees half a report or half a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any


def atomic_write_text(path: str, text: str) -> str:
    """Write `text` to `path` through a temporary file and a rename; creates the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str, obj: Any, indent: int = 2) -> str:
    """`obj` as JSON (with a final newline) at `path`, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
