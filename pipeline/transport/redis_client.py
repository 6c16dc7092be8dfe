"""Redis clients of every role (retrying connection errors with capped backoff) and the
heartbeats that `--check` looks for."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pipeline.errors import ConnectError
from pipeline.transport.mqtt_client import BACKOFF_MAX_S, BACKOFF_MIN_S, CONNECT_TIMEOUT_S
from pipeline.wire import names

log = logging.getLogger(__name__)


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
        self.key = names.heartbeat_key(site, role, sid)
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
        return [sid] if client.exists(names.heartbeat_key(site, role, sid)) else []
    prefix = names.heartbeat_prefix(site, role)
    return sorted(k.decode()[len(prefix):] for k in client.scan_iter(match=names.heartbeat_pattern(site, role)))


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
