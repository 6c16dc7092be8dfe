"""Fixtures of the fault-injection tests: synthetic CIFAR-10 on disk for the camera processes, and
a `harness` per test (private Mosquitto + Redis, role processes, accounting). A failing test
gets every role's and broker's log attached to its report."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from tests.faults.harness import Harness

TRAIN_PER_BATCH = 1001  # load_cifar10 keeps 5,000 training images for validation: needs more than that


@pytest.fixture(scope="session")
def fault_data(stream_setup, tmp_path_factory) -> str:
    """The `stream_setup` test frames as CIFAR-10's python layout (training batches are zeros),
    so that camera processes replay exactly the frames offline evaluation sees."""
    _, _, data, _, _ = stream_setup
    root = tmp_path_factory.mktemp("cifar")
    layout = root / "cifar-10-batches-py"
    layout.mkdir()
    for i in range(1, 6):
        batch = {b"data": np.zeros((TRAIN_PER_BATCH, 3072), np.uint8), b"labels": [0] * TRAIN_PER_BATCH}
        with open(layout / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    test = {b"data": np.ascontiguousarray(data.test.images.reshape(len(data.test), 3072)),
            b"labels": [int(x) for x in data.test.labels]}
    with open(layout / "test_batch", "wb") as f:
        pickle.dump(test, f, protocol=2)
    return str(root)


@pytest.fixture
def harness(request, stream_setup, fault_data, tmp_path):
    """A `Harness` with no broker started yet (`h.start_brokers(appendonly=...)`); everything it
    started is stopped afterwards. Needs `mosquitto` and `redis-server` on PATH: skipped without
    them, except in CI (env CI set), where these tests must run."""
    missing = [exe for exe in ("mosquitto", "redis-server") if shutil.which(exe) is None]
    if missing:
        message = f"fault-injection tests need {' and '.join(missing)} on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    h = Harness(tmp_path, stream_setup[0], fault_data, label=request.node.name)
    request.node._fault_harness = h
    yield h
    h.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    h = getattr(item, "_fault_harness", None)
    if h is not None and report.when == "call" and report.failed:
        report.sections.append(("role and broker logs", h.logs()))
