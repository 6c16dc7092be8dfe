"""Mosquitto and Redis in containers (testcontainers), for the tests' brokers.

Every container runs with host networking and its server on a free 127.0.0.1 port given on its
command line: no container address, no published port, nothing off loopback. No registry is
needed: `scripts/docker-engine.sh images` builds `ada-ddnn/mosquitto:local` and
`ada-ddnn/redis:local` here; where those are absent the official images are used (pulled).
testcontainers' reaper (Ryuk) is an image that cannot be pulled here either, so it is disabled
and every container is removed by the fixture that started it.
"""

from __future__ import annotations

import os
import socket
import time

from pipeline.transport.embedded import docker_answers, free_port, image_present

# The tests' one door to containers: the engine and image checks and free ports are the package's.
__all__ = ["docker_answers", "free_port", "image_present", "images", "MosquittoServer", "RedisServer",
           "ServerContainer", "LOCAL_MOSQUITTO", "LOCAL_REDIS"]

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

LOCAL_MOSQUITTO, LOCAL_REDIS = "ada-ddnn/mosquitto:local", "ada-ddnn/redis:local"
OFFICIAL_MOSQUITTO, OFFICIAL_REDIS = "eclipse-mosquitto:2", "redis:7"
START_TIMEOUT_S = 30.0


def images() -> tuple[str, str]:
    """(mosquitto image, redis image): env overrides, else the locally built ones, else official."""
    mq = os.environ.get("ADA_DDNN_TEST_MOSQUITTO_IMAGE") or (
        LOCAL_MOSQUITTO if image_present(LOCAL_MOSQUITTO) else OFFICIAL_MOSQUITTO)
    rd = os.environ.get("ADA_DDNN_TEST_REDIS_IMAGE") or (LOCAL_REDIS if image_present(LOCAL_REDIS) else OFFICIAL_REDIS)
    return mq, rd


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class ServerContainer:
    """One server in a container on a fixed loopback port; stop() and start() keep the port, so
    clients reconnect to the same URL (a broker restart, as the fault tests need)."""

    kind = "server"

    def __init__(self, image: str, port: int | None = None) -> None:
        self.image = image
        self.port = port or free_port()
        self._container = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def start(self) -> "ServerContainer":
        from testcontainers.core.container import DockerContainer

        c = DockerContainer(self.image).with_command(self.command()).with_kwargs(network_mode="host")
        c.start()
        self._container = c
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.port):
            c.get_wrapped_container().reload()
            if c.get_wrapped_container().status not in ("created", "running") or time.monotonic() > deadline:
                logs = b"".join(c.get_logs()).decode(errors="replace")[-2000:]
                self.remove()
                raise RuntimeError(f"{self.kind} container ({self.image}) did not answer on 127.0.0.1:{self.port}:\n{logs}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop and remove the container (its data goes with it, as after a crash without a disk)."""
        self.remove()
        deadline = time.monotonic() + START_TIMEOUT_S
        while _answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def remove(self) -> None:
        if self._container is not None:
            try:
                self._container.stop()
            finally:
                self._container = None

    @property
    def running(self) -> bool:
        return self._container is not None

    def __enter__(self) -> "ServerContainer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class MosquittoServer(ServerContainer):
    kind = "Mosquitto"

    def command(self) -> list[str]:
        conf = f"listener {self.port} 127.0.0.1\\nallow_anonymous true\\nmax_queued_messages 10000\\n"
        return ["sh", "-c", f"printf '{conf}' > /tmp/mosquitto.conf && exec mosquitto -c /tmp/mosquitto.conf"]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class RedisServer(ServerContainer):
    kind = "Redis"

    def command(self) -> list[str]:
        return ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--protected-mode", "no"]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
