"""Shared fixtures: real Mosquitto and Redis for the streaming tests, one per session.

When a Docker engine answers (`docker info`), testcontainers starts eclipse-mosquitto and redis
images; otherwise the tests use the services at ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL
(default 127.0.0.1:1883 and :6379). Without either they are skipped locally, and fail in CI
(env CI set): CI must never skip them. Every test gets its own site id, so tests do not see
one another's traffic, and the site's Redis keys are removed after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid

import pytest

from pipeline.settings import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL
from pipeline.transport.mqtt_client import parse_mqtt_url


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"broker tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def brokers():
    """(mqtt_url, redis_url) of a running Mosquitto and Redis for this session."""
    if _docker_answers():
        from testcontainers.community.mqtt import MosquittoContainer
        from testcontainers.redis import RedisContainer

        with MosquittoContainer("eclipse-mosquitto:2") as mq, RedisContainer("redis:7") as rd:
            mqtt_url = f"mqtt://{mq.get_container_host_ip()}:{mq.get_exposed_port(MosquittoContainer.MQTT_PORT)}"
            redis_url = f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0"
            yield mqtt_url, redis_url
        return
    mqtt_url = os.environ.get("ADA_DDNN_MQTT_URL", DEFAULT_MQTT_URL)
    redis_url = os.environ.get("ADA_DDNN_REDIS_URL", DEFAULT_REDIS_URL)
    u = parse_mqtt_url(mqtt_url)
    host, port = u.host, u.port
    if not _reachable(host, port):
        _unavailable(f"no Docker engine and no MQTT broker at {mqtt_url}")
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except redis.RedisError:
        _unavailable(f"no Docker engine and no Redis at {redis_url}")
    yield mqtt_url, redis_url


@pytest.fixture
def site(request, brokers):
    """A fresh site id for one test; its Redis keys are deleted afterwards."""
    import redis

    from pipeline.wire import names

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:40] + "-" + uuid.uuid4().hex[:8]
    yield name
    r = redis.Redis.from_url(brokers[1])
    keys = list(r.scan_iter(match=names.site_pattern(name), count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def redis_conn(brokers):
    import redis

    r = redis.Redis.from_url(brokers[1])
    yield r
    r.close()


@pytest.fixture(scope="session")
def stream_setup(tmp_path_factory):
    """A tiny ADA network saved as a checkpoint, synthetic frames, and thresholds that give a mix
    of exit 1, exit 2 and cloud on them: (checkpoint path, model, data, t1, t2)."""
    import torch

    from pipeline.offline.evaluation import collect
    from pipeline.offline.network import AdaDDNN, save_checkpoint
    from tests.helpers import synthetic_cifar, tiny_config

    torch.manual_seed(0)
    model = AdaDDNN(tiny_config()).eval()
    for mod in model.modules():  # spread the untrained network's outputs so that entropies differ
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 3.0)
    data = synthetic_cifar(n_train=8, n_val=8, n_test=600)
    c = collect(model, data.test.head(200), batch_size=100)
    t1 = round(float(c.cam_entropy.min(dim=1).values.quantile(0.25)), 4)
    t2 = round(float(c.edge_entropy.quantile(0.5)), 4)
    path = str(tmp_path_factory.mktemp("stream") / "tiny.safetensors")
    save_checkpoint(model, path, card={"thresholds": {"t1": t1, "t2": t2}})
    return path, model, data, t1, t2
