"""The field deployment, for real: `docker compose -f docker/compose.yaml up` with the secure broker
config (logins and ACL from docker/make-passwords.sh), Redis with AOF and passwords, two edge
aggregators, one cloud worker and six camera containers; 500 frames streamed, the broker
container restarted once mid-stream, every frame decided exactly once.

Needs a Docker engine with the compose v2 plugin and the images `scripts/docker-engine.sh up`
builds (ada-ddnn:latest, ada-ddnn/mosquitto:local, ada-ddnn/redis:local). In CI (env CI set)
their absence fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.config import default_data_dir
from pipeline.wire import names
from pipeline.wire.messages import Decision
from tests import containers

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
SITE = "field"
FRAMES = 500
FPS = 25  # per camera: 500 frames in 20 s
IMAGES = {"ADA_DDNN_IMAGE": "ada-ddnn:latest", "ADA_DDNN_MOSQUITTO_IMAGE": containers.LOCAL_MOSQUITTO,
          "ADA_DDNN_REDIS_IMAGE": containers.LOCAL_REDIS}
UP_TIMEOUT_S = 240  # image start, torch import and checkpoint load of 9 Python containers on 2 cores
STREAM_TIMEOUT_S = 240


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the compose deployment test must run in CI: {reason}")
    pytest.skip(reason)


def _env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


class Deployment:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.project = f"ada-test-{uuid.uuid4().hex[:8]}"

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-p", self.project, "-f", str(self.workdir / "compose.yaml"), *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[2:])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-3000:]}\n{self.logs()}")
        return done

    def logs(self, tail: int = 15) -> str:
        done = subprocess.run(["docker", "compose", "-p", self.project, "-f", str(self.workdir / "compose.yaml"),
                               "logs", "--no-color", "--tail", str(tail)], env=self.env, capture_output=True,
                              text=True, timeout=60)
        return done.stdout[-8000:]

    def states(self) -> dict[str, dict]:
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
        return {row["Service"]: row for row in rows}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if not containers.docker_answers():
        _unavailable("no Docker engine answers (scripts/docker-engine.sh up)")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        _unavailable("no docker compose v2 plugin (scripts/docker-engine.sh up installs it)")
    for image in IMAGES.values():
        if not containers.image_present(image):
            _unavailable(f"image {image} is missing (scripts/docker-engine.sh images builds it)")
    data = Path(os.environ.get("ADA_DDNN_DATA", default_data_dir()))
    if not (data / "cifar-10-batches-py" / "test_batch").exists():
        _unavailable(f"no CIFAR-10 at {data} (make data)")
    work = tmp_path_factory.mktemp("field")
    for name in ("compose.yaml", "mosquitto.conf"):
        shutil.copy(ROOT / "docker" / name, work / name)
    mqtt_port, redis_port = containers.free_port(), containers.free_port()
    metrics = {name: containers.free_port() for name in ("EDGE0", "EDGE1", "CLOUD", *(f"CAM{k}" for k in range(6)))}
    env = {**os.environ, **IMAGES, "ADA_DDNN_SITE": SITE, "ADA_DDNN_MQTT_PORT": str(mqtt_port),
           "ADA_DDNN_REDIS_PORT": str(redis_port), "ADA_DDNN_DATA_HOST": str(data), "ADA_DDNN_FPS": str(FPS),
           "ADA_DDNN_START": "0", "ADA_DDNN_STOP": str(FRAMES), "ADA_DDNN_OVERLOAD": "wait",
           "ADA_DDNN_DEADLINE_MS": "300", **{f"ADA_DDNN_METRICS_{k}": str(v) for k, v in metrics.items()}}
    made = subprocess.run(["bash", str(ROOT / "docker" / "make-passwords.sh"), SITE, str(work / "secrets")],
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    dep = Deployment(work, env)
    dep.mqtt_port, dep.redis_port, dep.metrics = mqtt_port, redis_port, metrics
    dep.admin = _env_file(work / "secrets" / "redis-admin.env")["REDISCLI_AUTH"]
    try:
        yield dep
    finally:
        dep.compose("down", "-v", "--timeout", "10", timeout=180, check=False)


def _results(dep: Deployment) -> list[Decision]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=dep.redis_port, password=dep.admin, socket_timeout=5)
    try:
        return [Decision.decode(fields[b"msg"]) for _, fields in r.xrange(names.results_stream(SITE))]
    finally:
        r.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_field_deployment_survives_a_broker_restart(deployment):
    dep = deployment
    t0 = time.monotonic()
    # `up` starts the brokers, waits for them to be healthy, then the edges and the cloud, waits for
    # their health checks (`ada-ddnn edge|cloud --check`: a live heartbeat), then the cameras.
    dep.compose("up", "-d", timeout=UP_TIMEOUT_S)
    states = dep.states()
    for svc in ("mosquitto", "redis", "edge0", "edge1", "cloud"):
        assert states[svc]["Health"] == "healthy", (svc, states[svc], dep.logs())
    assert {f"camera{k}" for k in range(6)} <= set(states)
    print(f"deployment up in {time.monotonic() - t0:.0f} s")

    restarted_at = None
    edge_counts: list[float] = []
    end = time.monotonic() + STREAM_TIMEOUT_S
    decided: list[Decision] = []
    while time.monotonic() < end:
        decided = _results(dep)
        if restarted_at is None and len(decided) >= FRAMES // 4:
            restarted_at = len(decided)
            dep.compose("restart", "mosquitto", timeout=60)  # mid-stream: cameras and edges reconnect
        for port in (dep.metrics["EDGE0"], dep.metrics["EDGE1"]):
            try:
                text = _scrape(port)
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("ada_observations_total{"):
                    edge_counts.append(float(line.rsplit(" ", 1)[1]))
        if len(decided) >= FRAMES:
            break
        time.sleep(0.5)  # results are Redis stream entries: polled, as an operator's dashboard would
    ids = [d.frame_id for d in decided]
    assert restarted_at is not None and restarted_at < FRAMES, "the broker was not restarted mid-stream"
    assert len(ids) == len(set(ids)), "a frame was decided twice"
    missing = sorted(set(range(FRAMES)) - set(ids))
    assert not missing, f"{len(missing)} frames never decided, e.g. {missing[:10]}\n{dep.logs()}"
    assert set(ids) == set(range(FRAMES))
    assert {d.exit for d in decided} <= {"exit1", "exit2", "cloud"}
    assert len({d.by for d in decided if d.exit != "cloud"}) == 2, "both aggregators should decide frames"
    assert edge_counts and max(edge_counts) > 0, "the edges' /metrics never showed an observation"
    states = dep.states()
    for k in range(6):
        st = states[f"camera{k}"]
        assert st["State"] in ("running", "exited") and st.get("ExitCode", 0) == 0, (st, dep.logs())
    for svc in ("mosquitto", "redis", "edge0", "edge1", "cloud"):
        assert states[svc]["State"] == "running", (svc, states[svc])
