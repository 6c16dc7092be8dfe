"""The lifecycle every running role shares: a unique service id, a clean stop on SIGTERM and
SIGINT, `BrokerService` (connect, run until stopped, close) for the edge and the cloud, capped
backoff for a broker outage, and a watchdog that turns a silent wedge into a loud exit."""

from __future__ import annotations

import cProfile
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.errors import Terminated
from pipeline.fileio import check_writable
from pipeline.settings import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL, check_fields
from pipeline.transport.metrics import RoleMetrics, Sample
from pipeline.transport.mqtt_client import BACKOFF_MAX_S, BACKOFF_MIN_S, MqttClient
from pipeline.transport.redis_client import Heartbeat
from pipeline.wire import names

log = logging.getLogger(__name__)

# What a Redis outage looks like to a running loop: retried with backoff, never fatal. (Redis's
# own client retries a few times first; see `redis_client`.) On a Redis Cluster also the time
# between a master's death and its replica's promotion: CLUSTERDOWN, a slot no node serves. And a
# Redis out of memory (OOM: maxmemory reached under noeviction), which refuses writes until
# something is freed or the limit raised: every write the loops make is safe to make again.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
              redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError, redis.exceptions.ClusterDownError,
              redis.exceptions.ClusterError, redis.exceptions.SlotNotCoveredError, redis.exceptions.OutOfMemoryError)
WATCHDOG_EXIT = 70  # exit status of a process the watchdog found stuck (EX_SOFTWARE)


@dataclass(frozen=True)
class BrokerRoleConfig:
    """What the edge and the cloud configs share: the site, both brokers and the checkpoint."""

    site: str = "site0"  # site id: prefix of every topic and key
    mqtt_url: str = DEFAULT_MQTT_URL  # Mosquitto, mqtt://host:port
    redis_url: str = DEFAULT_REDIS_URL  # Redis, redis://[user:password@]host:port/db (rediss:// for TLS); a Redis Cluster: redis+cluster://[user:password@]host:port,host:port (rediss+cluster:// for TLS)
    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors): the full checkpoint or this role's part

    heartbeat_s: float = field(default=2.0, metadata={"above": 0, "max": 3600})  # seconds between heartbeats; three missed and the service counts as dead
    metrics_port: int = field(default=0, metadata={"min": 0, "max": 65535})  # serve Prometheus /metrics on this TCP port; 0 = off
    metrics_host: str = "127.0.0.1"  # address /metrics listens on (0.0.0.0: a scraper on another host)

    def __post_init__(self) -> None:
        check_fields(self)  # ranges, as declared on the fields
        names.check_site(self.site)


def stop_on_signals(stop: threading.Event) -> dict[str, int | None]:
    """SIGTERM (docker stop) and SIGINT set `stop`, so the service closes its connections cleanly;
    the returned dict's "signal" is the first one that came (None while none has)."""
    got: dict[str, int | None] = {"signal": None}

    def handler(signum: int, _frame: object) -> None:
        if got["signal"] is None:
            got["signal"] = signum
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return got


def raise_on_sigterm() -> bool:
    """Until a role installs `stop_on_signals`: SIGTERM raises `Terminated` (a KeyboardInterrupt),
    so a command stopped while it loads (imports, data, checkpoint) or while a job runs ends
    through its `finally` blocks and says so, instead of dying silently. Main thread only:
    returns whether the handler went in."""
    def handler(_signum: int, _frame: object) -> None:
        raise Terminated("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, handler)
    return True


def service_id(role: str) -> str:
    """A unique id for one running service: role, host, pid and a random suffix."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in host)
    return f"{role}-{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Backoff:
    """Capped exponential backoff for an outage: 0.1 s, 0.2 s, ... 5 s, until `reset()`."""

    def __init__(self, first_s: float = BACKOFF_MIN_S, cap_s: float = BACKOFF_MAX_S) -> None:
        self.first_s, self.cap_s, self.failures = first_s, cap_s, 0

    def next(self) -> float:
        self.failures += 1
        return min(self.cap_s, self.first_s * 2 ** min(self.failures - 1, 30))

    def reset(self) -> None:
        self.failures = 0


class Watchdog:
    """Watches a loop that calls `tick()` every turn. A loop that has not turned for `limit_s`
    is stuck (a deadlock, a call that never returns): the watchdog logs every thread's stack and,
    with `exit_on_stuck` (a process of its own, under a supervisor), exits the process with
    status 70 so that it is restarted; in a thread of a bigger process it only logs."""

    def __init__(self, name: str, limit_s: float, exit_on_stuck: bool = False) -> None:
        self.name, self.limit_s, self.exit_on_stuck = name, limit_s, exit_on_stuck
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-{name}", daemon=True)

    def tick(self) -> None:
        self._last = time.monotonic()

    def age(self) -> float:
        """Seconds since the loop last turned."""
        return time.monotonic() - self._last

    def start(self) -> "Watchdog":
        self.tick()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(min(1.0, self.limit_s / 4)):
            age = self.age()
            if age < self.limit_s:
                reported = False
                continue
            if not reported:
                log.critical("%s: its loop has not turned for %.0f s (limit %.0f s); thread stacks follow", self.name,
                             age, self.limit_s)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                reported = True
            if self.exit_on_stuck:
                log.critical("%s: exiting with status %d so that its supervisor restarts it", self.name, WATCHDOG_EXIT)
                logging.shutdown()
                os._exit(WATCHDOG_EXIT)


def serve(service: Any) -> Any:
    """With env ADA_DDNN_PROFILE=PATH, the loop runs under cProfile and its profile is written there.
    Run a role in the foreground: `connect()`, `run(stop)` until SIGTERM/SIGINT, then `close()`;
    returns what `run` returned. Shared by the camera, edge and cloud commands. The signal
    handlers go in before connecting, so a stop request during the connect is honoured cleanly
    (the loop then ends at once) instead of killing the process mid-way."""
    stop = threading.Event()
    got = stop_on_signals(stop)
    if isinstance(service, BrokerService):
        service.exit_on_stuck = True  # its own process: a stuck loop exits for the supervisor to restart
    cfg = getattr(service, "cfg", None)
    metrics: RoleMetrics | None = getattr(service, "metrics", None)
    profile_path = os.environ.get("ADA_DDNN_PROFILE")  # a cProfile dump of the loop (the benchmarks use it)
    if profile_path:
        check_writable(profile_path)  # now, not when the run ends and the whole profile is lost
    if metrics is not None and getattr(cfg, "metrics_port", 0):
        metrics.serve(cfg.metrics_port, cfg.metrics_host)
    service.connect()
    profiler = cProfile.Profile() if profile_path else None
    try:
        if profiler is None:
            return service.run(stop)
        profiler.enable()  # the loop only: not the imports and connections before it
        try:
            return service.run(stop)
        finally:
            profiler.disable()
            profiler.dump_stats(profile_path)
    finally:
        service.close()
        if metrics is not None:
            metrics.close()
        ignore_stop_signals()
        if got["signal"] is not None:
            who = getattr(service, "sid", None) or f"site {getattr(cfg, 'site', '?')!r} {type(service).__name__}"
            log.info("%s: stopped by %s", who, signal.Signals(got["signal"]).name)


def ignore_stop_signals() -> None:
    """The role has closed its connections and only the interpreter's shutdown is left: a SIGTERM
    or SIGINT now has nothing to stop. Ignored rather than left to Python's handler, because
    CPython puts the default action (death by the signal) back while it finalizes, so a stop
    request in that window made a role that finished cleanly exit with -15. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


class BrokerService:
    """Lifecycle shared by the edge aggregator and the cloud worker: `connect()` opens the broker
    connections (subclasses set `self.redis`, `self.mqtt`, `self.heartbeat`), `run(stop)` is the
    loop; `start()` runs it in a background thread (replay and tests), `stop()` ends it and
    closes the connections."""

    role = "service"
    watchdog_s = 30.0  # a loop that has not turned for this long is stuck (see Watchdog)

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.redis: redis.Redis | None = None
        self.mqtt: MqttClient | None = None
        self.heartbeat: Heartbeat | None = None
        self.exit_on_stuck = False
        self.watchdog = Watchdog(f"{self.role} {sid}", self.watchdog_s)
        self.metrics = RoleMetrics(self.metric_samples)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def healthy(self) -> bool:
        """What the heartbeat reports: the loop turned within a third of the watchdog's limit. A
        wedged process stops beating, so `--check` fails for it before the watchdog fires."""
        return self.watchdog.age() < self.watchdog_s / 3

    def metric_samples(self) -> list[Sample]:
        """The role's counters and backlogs at this moment, for /metrics (`pipeline.transport.metrics`)."""
        return []

    def connect(self) -> None:
        raise NotImplementedError

    def run(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def start_watchdog(self) -> None:
        """Called by `connect()` once the connections are up."""
        self.watchdog.exit_on_stuck = self.exit_on_stuck
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.stop()
        if self.mqtt is not None:
            self.mqtt.close()
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
