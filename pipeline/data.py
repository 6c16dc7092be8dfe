"""CIFAR-10 in the official "python version" layout, read without trusting the pickles.

    cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}

The batches are pickles; unpickling an untrusted pickle can run arbitrary code, so
`SafeUnpickler` only rebuilds the types those files contain (dicts, lists, bytes, numpy arrays).
Splits: train = the first 45,000 training images, validation = the last `val_size` (5,000),
test = the official 10,000. Thresholds and model selection look at validation only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import DataError

log = logging.getLogger(__name__)

LAYOUT_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training-set channel means, for normalisation
STD = (0.2470, 0.2435, 0.2616)
SPLITS = ("train", "val", "test")  # the 45,000 / 5,000 (last training images) / 10,000 frame splits



class SafeUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR-10 batch holds; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: not part of a CIFAR-10 batch")
        if module.startswith("numpy") and module.endswith("multiarray"):
            from numpy._core import (
                multiarray,  # numpy >= 2 moved numpy.core to numpy._core
            )

            return getattr(multiarray, name)
        return super().find_class(module, name)


def safe_load_batch(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # corrupt or truncated file
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_batch(path)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except KeyError as err:
        raise DataError(f"{path}: missing key {err}") from err
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected N x 3072 data and N labels, got {data.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def find_layout(root: str) -> str:
    """The `cifar-10-batches-py` folder under `root` (or `root` itself)."""
    for candidate in (os.path.join(root, LAYOUT_DIR), root):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    mount = os.environ.get("ADA_DDNN_DATA_MOUNT", "")  # set by the image: what is mounted where
    if mount and os.path.normpath(root) == os.path.normpath(os.environ.get("ADA_DDNN_DATA", "")):
        raise DataError(f"no CIFAR-10 python-version layout under {root!r} (expected {LAYOUT_DIR}/data_batch_1..5 "
                        f"and test_batch): {root} is {mount}. Point it at a folder that holds it (Docker mounts a "
                        "host path that does not exist as an empty folder).")
    raise DataError(
        f"no CIFAR-10 python-version layout under {root!r} (expected {LAYOUT_DIR}/data_batch_1..5 and "
        "test_batch). Pass --data DIR or set ADA_DDNN_DATA; `ada-ddnn data --download` fetches the "
        "official copy; on our machines `python ../shared/datasets/cifar10/materialize.py DIR` writes it."
    )


def download(root: str) -> str:
    """Fetch the official archive with torchvision (needs internet and `pip install ada-ddnn[download]`)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise DataError("--download needs torchvision: pip install 'ada-ddnn[download]'") from err
    os.makedirs(root, exist_ok=True)
    CIFAR10(root, train=True, download=True)
    CIFAR10(root, train=False, download=True)
    return find_layout(root)


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x 3 x 32 x 32 and labels as int64 N."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        return self if n <= 0 or n >= len(self) else Split(self.name, self.images[:n], self.labels[:n])

    def slice(self, start: int, stop: int) -> "Split":
        return Split(self.name, self.images[start:stop], self.labels[start:stop])


@dataclass(frozen=True)
class Cifar10:
    train: Split
    val: Split
    test: Split
    digest: str  # sha256 of all images and labels, recorded in model cards
    path: str

    def split(self, name: str) -> Split:
        if name not in (*SPLITS, "validation"):
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return {"train": self.train, "val": self.val, "validation": self.val, "test": self.test}[name]


def load_cifar10(root: str, val_size: int = 5000) -> Cifar10:
    layout = find_layout(root)
    parts = [_batch_arrays(os.path.join(layout, f)) for f in TRAIN_FILES]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = _batch_arrays(os.path.join(layout, TEST_FILE))
    if not 0 < val_size < len(x):
        raise DataError(f"val_size must be in 1..{len(x) - 1}, got {val_size}")
    h = hashlib.sha256()
    for arr in (x, y, xt, yt):
        h.update(np.ascontiguousarray(arr).tobytes())
    n_train = len(x) - val_size
    log.info("CIFAR-10 from %s: %d train, %d validation, %d test", layout, n_train, val_size, len(xt))
    return Cifar10(
        train=Split("train", x[:n_train], y[:n_train]),
        val=Split("val", x[n_train:], y[n_train:]),
        test=Split("test", xt, yt),
        digest=h.hexdigest(),
        path=layout,
    )


def to_float(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 in [0, 1] on `device`."""
    t = torch.as_tensor(images).to(device)
    return t.float().div_(255.0)


def augment(scenes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with 4 pixels of reflect padding and random horizontal flip, per image."""
    n, _, h, w = scenes.shape
    pad = 4
    padded = torch.nn.functional.pad(scenes, (pad, pad, pad, pad), mode="reflect")
    dev = scenes.device
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()
