"""Shared fixtures: real Mosquitto and Redis for the streaming tests, fresh for every test module.

When a Docker engine answers (`docker info`), each test module gets its own Mosquitto and Redis
containers (tests/containers.py: testcontainers, host networking, free loopback ports), so the
fault tests can stop and restart them. Without an engine the tests use the services at
ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL (default 127.0.0.1:1883 and :6379); the pytest header
says which. In CI (env CI set) the containers are required: CI never falls back and never
skips. Every test gets its own site id, so tests do not see one another's traffic, and the
site's Redis keys are removed after it.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from pipeline.settings import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL
from pipeline.transport.mqtt_client import parse_mqtt_url
from tests import containers

_DOCKER = containers.docker_answers()


def pytest_report_header(config):
    if _DOCKER:
        mq, rd = containers.images()
        return f"brokers: containers per test module ({mq}, {rd}; host network, free loopback ports)"
    where = (os.environ.get("ADA_DDNN_MQTT_URL", DEFAULT_MQTT_URL), os.environ.get("ADA_DDNN_REDIS_URL", DEFAULT_REDIS_URL))
    return f"brokers: no Docker engine; local services at {where[0]} and {where[1]}"


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


@pytest.fixture(scope="module")
def broker_containers():
    """(MosquittoServer, RedisServer) in containers for this module; stop()/start() restart one on
    the same port. Fails in CI and skips elsewhere when no Docker engine answers."""
    if not _DOCKER:
        _unavailable("no Docker engine answers (scripts/docker-engine.sh up)")
    mq_image, rd_image = containers.images()
    with containers.MosquittoServer(mq_image) as mq, containers.RedisServer(rd_image) as rd:
        yield mq, rd


@pytest.fixture(scope="module")
def brokers(request):
    """(mqtt_url, redis_url) of a running Mosquitto and Redis for this test module."""
    if _DOCKER:
        mq, rd = request.getfixturevalue("broker_containers")
        yield mq.url, rd.url
        return
    if os.environ.get("CI"):
        pytest.fail("CI runs the broker tests against containers, and no Docker engine answers "
                    "(scripts/docker-engine.sh up)")
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
    """A fresh site id for one test; its Redis keys and its entry in the site registry are
    deleted afterwards."""
    import redis

    from pipeline.wire import names

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:40] + "-" + uuid.uuid4().hex[:8]
    yield name
    r = redis.Redis.from_url(brokers[1])
    keys = list(r.scan_iter(match=names.site_pattern(name), count=1000))
    if keys:
        r.delete(*keys)
    r.srem(names.sites_key(), name)  # an edge announced it: a `cloud --sites '*'` would serve it forever
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
