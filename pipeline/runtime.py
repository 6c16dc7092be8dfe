"""What every streaming role (camera, edge, cloud, replay) shares.

- role configs from `ADA_DDNN_*` env vars (`config_from_env`) and CLI flags that fall back to them;
- broker clients: paho MQTT v5 clients that connect with capped exponential backoff, and Redis
  clients that retry connection errors the same way;
- heartbeats: a Redis key with a TTL per running service, which `--check` looks for;
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable, TypeVar

import paho.mqtt.client as mqtt
import redis
import torch
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pipeline import topics
from pipeline.config import env_default
from pipeline.errors import ConnectError
from pipeline.services import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL, parse_mqtt_url

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 30.0  # give up on a broker after this long (retrying with capped backoff meanwhile)
BACKOFF_MIN_S = 0.1  # first retry delay
BACKOFF_MAX_S = 5.0  # cap of the exponential backoff between retries
MQTT_KEEPALIVE_S = 30


# --- config -------------------------------------------------------------------------------

def config_from_env(cls: type[T], **overrides: Any) -> T:
    """A frozen role config: each field from `overrides`, else env `ADA_DDNN_<FIELD>`, else its default.

    Fields whose default is None or a tuple are read as text ("" = None; tuples comma-separated ints)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = f.name.upper()
        if isinstance(default, tuple):
            raw = os.environ.get(f"ADA_DDNN_{name}")
            if raw is not None:
                values[f.name] = tuple(int(x) for x in raw.split(",") if x.strip())
        elif default is None:
            raw = os.environ.get(f"ADA_DDNN_{name}")
            if raw is not None and raw != "":
                values[f.name] = raw
        else:
            values[f.name] = env_default(name, default)
    values.update(overrides)
    return cls(**values)


def add_broker_args(p: argparse.ArgumentParser, mqtt: bool = True, redis_: bool = True, default: bool = True) -> None:
    """--site, --mqtt-url, --redis-url with env fallbacks (ADA_DDNN_SITE, _MQTT_URL, _REDIS_URL)."""
    p.add_argument("--site", default=env_default("SITE", "site0"),
                   help="site id: prefix of every topic and key (env ADA_DDNN_SITE; default %(default)s)")
    if mqtt:
        p.add_argument("--mqtt-url", default=env_default("MQTT_URL", DEFAULT_MQTT_URL if default else None),
                       help="Mosquitto, mqtt://host:port (env ADA_DDNN_MQTT_URL; default %(default)s)")
    p.add_argument("--threads", type=int, default=env_default("THREADS", 0),
                   help="torch intra-op threads, 0 = torch's default (env ADA_DDNN_THREADS)")
    if redis_:
        p.add_argument("--redis-url", default=env_default("REDIS_URL", DEFAULT_REDIS_URL if default else None),
                       help="Redis, redis://host:port/db (env ADA_DDNN_REDIS_URL; default %(default)s)")


def set_threads(n: int) -> None:
    """torch intra-op threads (0 keeps torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM (docker stop) and SIGINT set `stop`, so the service closes its connections cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def service_id(role: str) -> str:
    """A unique id for one running service: role, host, pid and a random suffix."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)
    return f"{role}-{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- MQTT ---------------------------------------------------------------------------------

def mqtt_client(url: str, client_id: str, on_connect: Callable[[mqtt.Client], None] | None = None,
                on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
                will: tuple[str, bytes] | None = None) -> mqtt.Client:
    """A connected MQTT v5 client with its network thread running.

    `on_connect(client)` runs on every (re)connect: subscribe there so subscriptions survive
    reconnects. `on_message(msg)` runs in the network thread: keep it tiny. `will` is a retained
    QoS 1 last will (topic, payload). Reconnects use paho's capped backoff."""
    host, port = parse_mqtt_url(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_MAX_S))
    client.max_queued_messages_set(0)  # paho queues publishes while reconnecting, unbounded
    connected = threading.Event()

    def _on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho callback
        if reason_code.is_failure:
            log.warning("MQTT %s at %s refused the connection: %s", client_id, url, reason_code)
            return
        try:
            if on_connect is not None:
                on_connect(c)
        except Exception:  # noqa: BLE001 - a callback error must be logged, never swallowed silently
            log.exception("MQTT %s: on_connect failed", client_id)
        connected.set()

    def _on_disconnect(c, userdata, flags, reason_code, properties):  # noqa: ANN001
        if reason_code != 0:
            log.warning("MQTT %s lost the connection to %s (%s); paho reconnects with backoff", client_id, url, reason_code)

    def _on_message(c, userdata, msg):  # noqa: ANN001
        try:
            on_message(msg)  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            log.exception("MQTT %s: on_message failed for topic %s", client_id, msg.topic)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    if on_message is not None:
        client.on_message = _on_message
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    delay, deadline = BACKOFF_MIN_S, time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            client.connect(host, port, keepalive=MQTT_KEEPALIVE_S, clean_start=True)
            break
        except OSError as err:
            if time.monotonic() + delay > deadline:
                raise ConnectError(f"MQTT broker {url} unreachable for {CONNECT_TIMEOUT_S:.0f}s: {err}") from err
            log.warning("MQTT broker %s unreachable (%s); retrying in %.1fs", url, err, delay)
            time.sleep(delay)  # backoff between connection attempts
            delay = min(BACKOFF_MAX_S, delay * 2)
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S):
        client.loop_stop()
        raise ConnectError(f"MQTT broker {url} accepted TCP but no MQTT session for {client_id}")
    return client


def close_mqtt(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


# --- Redis --------------------------------------------------------------------------------

def redis_client(url: str) -> redis.Redis:
    """A Redis client that retries connection errors with capped exponential backoff; pinged once."""
    retry = Retry(ExponentialBackoff(cap=BACKOFF_MAX_S, base=BACKOFF_MIN_S), retries=6)
    client = redis.Redis.from_url(url, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                  socket_connect_timeout=5, health_check_interval=30)
    delay, deadline = BACKOFF_MIN_S, time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            client.ping()
            return client
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if time.monotonic() + delay > deadline:
                raise ConnectError(f"Redis {url} unreachable for {CONNECT_TIMEOUT_S:.0f}s: {err}") from err
            log.warning("Redis %s unreachable (%s); retrying in %.1fs", url, err, delay)
            time.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)


class Heartbeat:
    """Sets `ada:{site}:heartbeat:{role}:{id}` with a TTL every `interval_s` in a daemon thread."""

    def __init__(self, client: redis.Redis, site: str, role: str, sid: str, interval_s: float = 2.0,
                 info: Callable[[], dict] | None = None) -> None:
        self.key = topics.heartbeat_key(site, role, sid)
        self.client, self.role, self.sid = client, role, sid
        self.interval_s = interval_s
        self.ttl_ms = int(3 * interval_s * 1000)  # three missed beats and the service counts as dead
        self.info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{sid}", daemon=True)

    def beat(self) -> None:
        body = {"role": self.role, "id": self.sid, "at": time.time(), "pid": os.getpid(), **(self.info() if self.info else {})}
        self.client.set(self.key, json.dumps(body), px=self.ttl_ms)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as err:
                log.warning("heartbeat %s failed: %s", self.key, err)

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.delete(self.key)
        except redis.RedisError as err:
            log.warning("could not remove heartbeat %s: %s", self.key, err)


def alive(client: redis.Redis, site: str, role: str, sid: str | None = None) -> list[str]:
    """Ids of the services of `role` at `site` whose heartbeat has not expired (just `sid` if given)."""
    if sid:
        return [sid] if client.exists(topics.heartbeat_key(site, role, sid)) else []
    prefix = topics.heartbeat_key(site, role, "x")[:-1]
    return sorted(k.decode()[len(prefix):] for k in client.scan_iter(match=topics.heartbeat_pattern(site, role)))


def check_alive(redis_url: str, site: str, role: str, sid: str | None = None) -> int:
    """Exit status for `--check`: 0 when a heartbeat of `role` (or of `sid`) is alive, else 1."""
    try:
        ids = alive(redis_client(redis_url), site, role, sid)
    except (ConnectError, redis.RedisError) as err:
        log.error("check %s at site %r: %s", role, site, err)
        return 1
    if ids:
        log.info("%s alive at site %r: %s", role, site, ", ".join(ids))
        return 0
    log.error("no live %s at site %r", role, site)
    return 1


# --- batch-size-invariant forward passes ------------------------------------------------


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
