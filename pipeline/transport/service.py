"""The lifecycle every running role shares: a unique service id, a clean stop on SIGTERM and
SIGINT, and `BrokerService` (connect, run until stopped, close) for the edge and the cloud."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import redis

from pipeline.settings import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL
from pipeline.transport.mqtt_client import close_mqtt
from pipeline.transport.redis_client import Heartbeat
from pipeline.wire import names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerRoleConfig:
    """What the edge and the cloud configs share: the site, both brokers and the checkpoint."""

    site: str = "site0"  # site id: prefix of every topic and key
    mqtt_url: str = DEFAULT_MQTT_URL  # Mosquitto, mqtt://host:port
    redis_url: str = DEFAULT_REDIS_URL  # Redis, redis://[user:password@]host:port/db (rediss:// for TLS)
    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors): the full checkpoint or this role's part

    heartbeat_s: float = 2.0  # seconds between heartbeats; three missed and the service counts as dead

    def __post_init__(self) -> None:
        names.check_site(self.site)
        if not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be positive, got {self.heartbeat_s}")


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (docker stop) and SIGINT set `stop`, so the service closes its connections cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def service_id(role: str) -> str:
    """A unique id for one running service: role, host, pid and a random suffix."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)
    return f"{role}-{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def serve(service: Any) -> Any:
    """Run a role in the foreground: `connect()`, `run(stop)` until SIGTERM/SIGINT, then `close()`;
    returns what `run` returned. Shared by the camera, edge and cloud commands. The signal
    handlers go in before connecting, so a stop request during the connect is honoured cleanly
    (the loop then ends at once) instead of killing the process mid-way."""
    stop = threading.Event()
    stop_on_signals(stop)
    service.connect()
    try:
        return service.run(stop)
    finally:
        service.close()


class BrokerService:
    """Lifecycle shared by the edge aggregator and the cloud worker: `connect()` opens the broker
    connections (subclasses set `self.redis`, `self.mqtt`, `self.heartbeat`), `run(stop)` is the
    loop; `start()` runs it in a background thread (replay and tests), `stop()` ends it and
    closes the connections."""

    role = "service"

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.redis: redis.Redis | None = None
        self.mqtt: mqtt.Client | None = None
        self.heartbeat: Heartbeat | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.mqtt is not None:
            close_mqtt(self.mqtt)
            self.mqtt = None
        if self.redis is not None:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.redis.close()
            self.redis = None

    def start(self):
        """Connect and run in a background thread."""
        self.connect()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name=f"{self.role}-{self.sid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.close()
