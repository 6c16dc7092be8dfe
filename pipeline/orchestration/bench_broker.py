"""`ada-ddnn bench broker`: the pipeline against Mosquitto in a container, one container per broker
configuration.

    scripts/docker-engine.sh up          # an engine and the ada-ddnn/mosquitto:local image
    ada-ddnn bench broker --json runs/bench_broker.json --doc docs/BENCHMARKS.md

For each configuration a Mosquitto container is started (host networking, a free 127.0.0.1 port,
`docker run --cpus` where the configuration limits the broker's CPU), and two things are
measured against it:

- raw: a paho QoS 1 publisher process to a subscriber process, messages of an observation's size,
  no model: messages/s received, and messages dropped (sent, acknowledged, never delivered);
- pipeline: pre-encoded camera observations (six cameras, real features of test frames) offered
  at --rate frames/s for --seconds into one edge process and one cloud worker (Redis private to
  the run): frames/s decided, frames shed (named by the cameras), lost (neither: the broker
  dropped them) and capture-to-decision latency.

Configurations (`--configs`, comma-separated):
  default      Mosquitto's defaults: 20 messages in flight and 1000 queued per client, no persistence
  tuned        this project's broker settings (docker/mosquitto.conf): 100 in flight, 10000 queued, TCP_NODELAY
  persistence  tuned + persistence on disk (autosave every 60 s, and on shutdown)
  tls          tuned, clients over TLS 1.2 (a CA and a server certificate made for the run)
  cpus-1       tuned, the broker container limited to 1 CPU (docker run --cpus 1)
  cpus-0.5     tuned, the broker container limited to half a CPU
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.checkpoint import thresholds
from pipeline.compute import set_threads
from pipeline.config import default_data_dir
from pipeline.data import load_cifar10, to_float
from pipeline.errors import ReplayError, ServiceError
from pipeline.fileio import atomic_write_text
from pipeline.offline.network import load_checkpoint
from pipeline.orchestration.bench_stream import (
    Site,
    StreamBenchConfig,
    _observations,
    _start_edge_cloud,
    broker_ceiling,
    offer,
)
from pipeline.orchestration.loadgen import write_templates
from pipeline.orchestration.roles import stop_all
from pipeline.settings import check_fields
from pipeline.transport.embedded import docker_answers, embedded_services, free_port, image_present, wait_for_port
from pipeline.transport.redis_client import redis_client

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "ada-ddnn/mosquitto:local"
START_TIMEOUT_S = 30.0
TUNED = "max_inflight_messages 100\nmax_queued_messages 10000\nmax_queued_bytes 104857600\nset_tcp_nodelay true\n"
CONFIGS: dict[str, dict] = {
    "default": {"conf": "", "cpus": None, "tls": False},
    "tuned": {"conf": TUNED, "cpus": None, "tls": False},
    "persistence": {"conf": TUNED + "persistence true\npersistence_location /mosquitto/data/\nautosave_interval 60\n",
                    "cpus": None, "tls": False},
    "tls": {"conf": TUNED, "cpus": None, "tls": True},
    "cpus-1": {"conf": TUNED, "cpus": 1.0, "tls": False},
    "cpus-0.5": {"conf": TUNED, "cpus": 0.5, "tls": False},
}
SECTION = "bench broker"  # docs/BENCHMARKS.md holds this command's table between markers of this name


@dataclass(frozen=True)
class BrokerBenchConfig:
    """What `bench broker` measures and for how long."""

    checkpoint: str = "models/ada.safetensors"  # the network whose observations are streamed
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    image: str = DEFAULT_IMAGE  # Mosquitto image (scripts/docker-engine.sh builds ada-ddnn/mosquitto:local; eclipse-mosquitto:2 works too)
    configs: tuple[str, ...] = tuple(CONFIGS)  # broker configurations to measure, in this order
    messages: int = field(default=10_000, metadata={"min": 1})  # QoS 1 messages of the raw publisher -> subscriber run
    rate: int = field(default=300, metadata={"min": 1})  # frames/s offered to the edge (x6 observations/s): near this machine's edge capacity
    seconds: float = field(default=6.0, metadata={"above": 0})  # how long the rate is offered
    templates: int = field(default=256, metadata={"min": 1})  # distinct real observations (test frames) the load generator cycles through

    def __post_init__(self) -> None:
        check_fields(self)  # ranges, as declared on the fields
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown broker configurations {unknown}; known: {list(CONFIGS)}")


def _docker(*args: str, timeout: float = 60) -> str:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as err:
        raise ReplayError("bench broker needs docker (scripts/docker-engine.sh up)") from err
    if done.returncode != 0:
        raise ReplayError(f"docker {' '.join(args[:3])} ... failed: {done.stderr.strip()[-1000:]}")
    return done.stdout.strip()


def _certificates(folder: str) -> str:
    """A CA and a server certificate for 127.0.0.1 (openssl); returns the CA's path."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ada-bench-ca", "-keyout", "ca.key",
        "-out", "ca.pem")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    with open(os.path.join(folder, "san.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.cnf", "-out", "server.pem")
    for name in ("server.key", "server.pem", "ca.pem"):
        os.chmod(os.path.join(folder, name), 0o644)  # the broker drops to its own user in the container
    return os.path.join(folder, "ca.pem")


class BrokerContainer:
    """Mosquitto of one configuration in a container, on a free loopback port."""

    def __init__(self, image: str, name: str, spec: dict, workdir: str) -> None:
        self.image, self.name, self.spec = image, name, spec
        self.port = free_port()
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.container = ""
        conf = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n" + spec["conf"]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        if spec["tls"]:
            ca = _certificates(self.dir)
            conf += ("cafile /certs/ca.pem\ncertfile /certs/server.pem\nkeyfile /certs/server.key\n"
                     "tls_version tlsv1.2\n")
            self.url = f"mqtts://127.0.0.1:{self.port}?ca={ca}"
        with open(os.path.join(self.dir, "mosquitto.conf"), "w") as f:
            f.write(conf + "log_dest stdout\n")
        os.chmod(os.path.join(self.dir, "mosquitto.conf"), 0o644)

    def __enter__(self) -> "BrokerContainer":
        args = ["run", "-d", "--network", "host", "-v", f"{self.dir}/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"]
        if self.spec["tls"]:
            args += ["-v", f"{self.dir}:/certs:ro"]
        if self.spec["cpus"]:
            args += ["--cpus", str(self.spec["cpus"])]
        self.container = _docker(*args, self.image, "mosquitto", "-c", "/mosquitto/config/mosquitto.conf")
        try:
            wait_for_port("127.0.0.1", self.port, START_TIMEOUT_S)
        except ServiceError as err:
            logs = subprocess.run(["docker", "logs", self.container], capture_output=True, text=True).stdout
            self.__exit__()  # __exit__ does not run for a failed __enter__: the container goes here
            raise ReplayError(f"Mosquitto ({self.name}): {err}\n{logs[-1500:]}") from err
        log.info("broker %s: container %s on %s", self.name, self.container[:12], self.url.split("?")[0])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.container:
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, timeout=60)


def measure(cfg: BrokerBenchConfig, name: str, templates_path: str, size: int, redis_url: str, t1, t2,
            workdir: str) -> dict:
    spec = CONFIGS[name]
    with BrokerContainer(cfg.image, name, spec, workdir) as broker:
        raw = broker_ceiling(broker.url, size, cfg.messages)
        raw["dropped"] = raw["sent"] - raw["received"]
        r = redis_client(redis_url)
        site = Site(r, f"bench-broker-{name.replace('.', '_')}-{time.monotonic_ns() % 10**8}")
        scfg = StreamBenchConfig(checkpoint=cfg.checkpoint, data=cfg.data)
        procs = _start_edge_cloud(scfg, site.site, broker.url, redis_url, t1, t2, workdir)
        try:
            pipeline = offer(site, broker.url, templates_path, cfg.rate, 0, cfg.seconds, settle_s=10.0)
        finally:
            exits = stop_all(procs)
            r.close()
    pipeline.pop("generator", None)
    return {"config": name, "cpus": spec["cpus"], "tls": spec["tls"], "raw": raw, "pipeline": pipeline,
            "exit_status": exits}


def bench_broker(cfg: BrokerBenchConfig) -> dict:
    t0 = time.time()
    if not docker_answers():
        raise ReplayError("bench broker needs a Docker engine that answers (scripts/docker-engine.sh up)")
    if not image_present(cfg.image):
        raise ReplayError(f"no image {cfg.image} on this machine (scripts/docker-engine.sh images builds "
                          f"{DEFAULT_IMAGE}; --image names another)")
    set_threads(1)
    model = load_checkpoint(cfg.checkpoint)
    t1, t2 = thresholds(cfg.checkpoint, model.cfg)
    data = load_cifar10(cfg.data)
    scenes = to_float(data.test.images[:cfg.templates])
    workdir = tempfile.mkdtemp(prefix="ada-bench-broker-")
    templates_path = os.path.join(workdir, "observations.msgpack")
    observations = _observations(model, scenes, data.test.labels[:cfg.templates])
    write_templates(templates_path, observations)
    size = int(np.mean([len(o.encode()) for o in observations[0]]))
    rows = []
    with embedded_services("mqtt://127.0.0.1:1", None) as (_, redis_url):  # Redis only: the broker is the container
        for name in cfg.configs:
            log.info("broker configuration %s ...", name)
            rows.append(measure(cfg, name, templates_path, size, redis_url, t1, t2, workdir))
            p = rows[-1]["pipeline"]
            log.info("%s: raw %.0f msg/s (%d dropped); pipeline %s fps decided of %d offered, shed %d, lost %d",
                     name, rows[-1]["raw"]["received_per_s"], rows[-1]["raw"]["dropped"], p["decided_fps"],
                     cfg.rate, p["shed_frames"], p["lost"])
    shutil.rmtree(workdir, ignore_errors=True)
    return {"config": {**cfg.__dict__, "thresholds": {"t1": t1, "t2": t2}, "message_bytes": size},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "docker": _docker("version", "--format", "{{.Server.Version}}")},
            "image": cfg.image, "rows": rows, "seconds": round(time.time() - t0, 1)}


def table(result: dict) -> str:
    """The Markdown table of a result."""
    c = result["config"]
    lines = [f"| broker configuration | raw QoS 1 msg/s ({c['message_bytes']} B) | raw dropped | pipeline frames/s "
             f"decided (of {c['rate']} offered) | shed | lost | latency p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        raw, p = row["raw"], row["pipeline"]
        lat = p["latency_ms"]["all"] or {}
        lines.append(f"| {row['config']} | {raw['received_per_s']:,.0f} | {raw['dropped']} | {p['decided_fps']} | "
                     f"{p['shed_frames']} | {p['lost']} | {lat.get('p50', '-')} / {lat.get('p99', '-')} |")
    return "\n".join(lines)


def section(result: dict, command: str) -> str:
    c = result["config"]
    return (f"## Mosquitto configurations in containers (`bench broker`)\n\n"
            f"Made by `{command}` on {result['machine']['cpus']} cores (Docker {result['machine']['docker']}, "
            f"image `{result['image']}`), {result['seconds']:.0f} s. Raw: {c['messages']:,} QoS 1 messages from a paho "
            f"publisher process to a subscriber process. Pipeline: six cameras' pre-encoded observations at "
            f"{c['rate']} frames/s ({6 * c['rate']} messages/s) for {c['seconds']:g} s into one edge process and one "
            f"cloud worker; shed frames are named by the cameras, lost ones are neither decided nor named. Every "
            f"process shares the machine's cores with the broker, so a CPU limit on the broker shows where "
            f"the broker, not the edge, becomes the bottleneck.\n\n{table(result)}\n\n{reading(result)}\n")


def reading(result: dict) -> str:
    """What the table says, computed from it (one run: differences of a few percent are noise)."""
    rows = result["rows"]
    raw = [r["raw"]["received_per_s"] for r in rows]
    fps = [r["pipeline"]["decided_fps"] or 0.0 for r in rows]
    losses = sum(r["pipeline"]["lost"] + r["pipeline"]["shed_frames"] + r["raw"]["dropped"] for r in rows)
    rate = result["config"]["rate"]
    held = [r["config"] for r in rows if r["pipeline"]["decided"] == r["pipeline"]["frames"]
            and (r["pipeline"]["decided_fps"] or 0) >= 0.95 * rate]
    half = next((r["raw"]["received_per_s"] for r in rows if r["cpus"] == 0.5), None)
    spread = 100 * (max(raw) - min(raw)) / max(raw) if raw and max(raw) else 0.0
    return (f"Raw QoS 1 rates ranged {min(raw):,.0f}-{max(raw):,.0f} messages/s over the configurations (a spread of "
            f"{spread:.0f}%); the pipeline decided {min(fps):g}-{max(fps):g} frames/s of the {rate} offered, and the "
            f"configurations that held the rate (all frames decided, >= 95% of it) were: {', '.join(held) or 'none'}. "
            f"Frames shed, lost or dropped in all runs together: {losses}. "
            + (f"Limited to half a CPU the broker still passed {half:,.0f} messages/s, so on this machine the raw "
               f"ceiling is set by the Python publisher and subscriber processes, not by Mosquitto. " if half else "")
            + "Each row is a single run on a two-core machine that other work shared, so the spread between rows is "
              "not attributable to the configuration without repeats; what the table does show is that every "
              "configuration carried the offered load without a loss.")


def write_section(path: str, text: str, name: str = SECTION) -> None:
    """Replace this command's section of a Markdown page (between its markers), or append it."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    try:
        with open(path) as f:
            page = f.read()
    except FileNotFoundError:
        page = ""
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in page and end in page:
        page = page[:page.index(begin)] + block + page[page.index(end) + len(end):].lstrip("\n")
    else:
        page = page.rstrip("\n") + ("\n\n" if page else "") + block
    atomic_write_text(path, page)
