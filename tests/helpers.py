"""Small configs and synthetic data shared by the tests."""

from __future__ import annotations

import time

import msgpack
import numpy as np

from pipeline.config import ModelConfig
from pipeline.data import Cifar10, Split
from pipeline.wire import names
from pipeline.wire.messages import Decision, FeatureTensor


def tiny_config(**changes) -> ModelConfig:
    """A network small enough to run in milliseconds on a CPU, same structure as the release one."""
    base = dict(camera_channels=8, camera_head_channels=8, wire_channels=4, edge_channels=16, cloud_channels=16)
    base.update(changes)
    return ModelConfig(**base)


def stream_model(cfg: ModelConfig, data: Cifar10, seed: int = 0):
    """An untrained network of config `cfg` whose outputs are spread out (so that entropies differ)
    and thresholds that send a mix of its `data.test` frames to exit 1, exit 2 and the cloud:
    (model, t1, t2). The session fixture `stream_setup` is the concat ADA network of this."""
    import torch

    from pipeline.offline.evaluation import collect
    from pipeline.offline.network import AdaDDNN

    torch.manual_seed(seed)
    model = AdaDDNN(cfg).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 3.0)
    c = collect(model, data.test.head(200), batch_size=100)
    t1 = round(float(c.cam_entropy.min(dim=1).values.quantile(0.25)), 4) if c.cam_entropy is not None else None
    t2 = round(float(c.edge_entropy.quantile(0.5)), 4)
    return model, t1, t2


def synthetic_cifar(n_train: int = 64, n_val: int = 32, n_test: int = 32, seed: int = 0) -> Cifar10:
    rng = np.random.default_rng(seed)

    def split(name: str, n: int) -> Split:
        return Split(name, rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))

    return Cifar10(split("train", n_train), split("val", n_val), split("test", n_test), "synthetic", "synthetic")


def wait_results(r, site: str, n: int, timeout_s: float = 20) -> list[Decision]:
    """Block on the site's results stream (a Redis client `r`) until n results are there."""
    last, got = "0-0", []
    while len(got) < n:
        resp = r.xread({names.results_stream(site): last}, block=int(timeout_s * 1000))
        if not resp:
            break
        for entry_id, f in resp[0][1]:
            last = entry_id
            got.append(Decision.decode(f[b"msg"]))
    return got


def poll(fn, timeout_s=5.0):
    """fn() until it returns something truthy; deadlines are wall-clock, so there is no event to await."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        out = fn()
        if out:
            return out
        time.sleep(0.01)
    return fn()


def pack(obj) -> bytes:
    """msgpack as the wire packs it (bytes as bin)."""
    return msgpack.packb(obj, use_bin_type=True)


def over_the_wire(f: FeatureTensor) -> FeatureTensor:
    """`f` packed as a message field and read back, as a receiver gets it."""
    return FeatureTensor.from_wire(msgpack.unpackb(pack(f.to_wire()), raw=False))


def beat(sid: str, role: str = "edge") -> str:
    """A heartbeat body as `pipeline.transport.redis_client.Heartbeat` writes it: a key holding
    anything else (or without expiry) does not count as a live service."""
    import json

    return json.dumps({"role": role, "id": sid, "at": time.time()})
