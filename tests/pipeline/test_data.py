import os
import pickle

import numpy as np
import pytest
import torch

from pipeline.data import (
    CLASSES,
    DataError,
    augment,
    find_layout,
    load_cifar10,
    safe_load_batch,
)


def _write_layout(root, n_per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    out = root / "cifar-10-batches-py"
    out.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}
        with open(out / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return out


def test_loads_official_layout(tmp_path):
    _write_layout(tmp_path)
    data = load_cifar10(str(tmp_path), val_size=10)
    assert data.train.images.shape == (90, 3, 32, 32) and data.train.images.dtype == np.uint8
    assert len(data.val) == 10 and len(data.test) == 20
    assert len(data.digest) == 64
    assert load_cifar10(str(tmp_path), val_size=10).digest == data.digest


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        safe_load_batch(str(path))


def test_rejects_malformed_batches(tmp_path):
    out = _write_layout(tmp_path)
    with open(out / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(str(tmp_path), val_size=10)
    (out / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError):
        safe_load_batch(str(out / "test_batch"))


def test_missing_layout_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="ADA_DDNN_DATA"):
        find_layout(str(tmp_path))


def test_augment_keeps_shape_and_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    y = augment(x, g)
    assert y.shape == x.shape
    # A crop of a reflect-padded image never invents values outside the input's range.
    assert y.min() >= x.min() and y.max() <= x.max()
    assert not torch.equal(x, y)


def test_class_names():
    assert len(CLASSES) == 10 and CLASSES[0] == "airplane"


def test_an_empty_mount_in_a_container_names_the_host_folder(tmp_path, monkeypatch):
    """In the image, ADA_DDNN_DATA is the mount point: the error names what is mounted there (the
    host folder of the compose file), not the flag or variable a user cannot usefully change."""
    from pipeline.data import find_layout

    monkeypatch.setenv("ADA_DDNN_DATA", str(tmp_path))
    monkeypatch.setenv("ADA_DDNN_DATA_MOUNT", "the host folder ADA_DDNN_DATA_HOST mounted read-only")
    with pytest.raises(DataError, match="is the host folder ADA_DDNN_DATA_HOST mounted read-only") as err:
        find_layout(str(tmp_path))
    assert "--data" not in str(err.value)
    monkeypatch.delenv("ADA_DDNN_DATA_MOUNT")
    with pytest.raises(DataError, match="Pass --data DIR or set ADA_DDNN_DATA"):
        find_layout(str(tmp_path))
