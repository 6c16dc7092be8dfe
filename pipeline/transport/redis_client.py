"""Redis clients of every role (retrying connection errors with capped backoff) and the
heartbeats that `--check` looks for.

A `redis://` (or `rediss://`, TLS) URL gives a client of one Redis; a
`redis+cluster://[user:password@]host:port,host:port,...` URL (`rediss+cluster://` for TLS) gives
a Redis Cluster client (`redis.cluster.RedisCluster`, the nodes listed are where it starts to
learn the cluster; it follows MOVED/ASK redirections and a failover). Every role takes either
through its `--redis-url`. All keys of a site share one hash slot (`pipeline.wire.names`), so
every pipeline and script of ours runs on the one node that serves the site."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from pipeline.errors import ConnectError
from pipeline.transport.mqtt_client import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    CONNECT_TIMEOUT_S,
)
from pipeline.wire import names

log = logging.getLogger(__name__)


SOCKET_TIMEOUT_S = 10.0  # a reply that takes longer means the server is gone (blocking reads use 0.2 s)
COMMAND_RETRIES = 2  # the client's own retries of a command on a connection error, before the loop's backoff
CHECK_TIMEOUT_S = 3.0  # `--check` (a docker health check): a Redis that does not answer by then means not alive


def safe_url(url: str) -> str:
    """A Redis URL without its password, for logs and errors."""
    u = urlparse(url)
    return url.replace(f":{u.password}@", ":***@") if u.password else url


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# What a cluster without a serving node for a slot looks like (a master died and no replica has
# taken over yet; no start-up node answers): an outage, retried like a connection error.
CLUSTER_DOWN = (ClusterDownError, ClusterError, RedisClusterException)
# redis-py's words when a start-up node answers as a server without cluster mode.
NOT_A_CLUSTER = "Cluster mode is not enabled"


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) start-up nodes of a `redis+cluster://` URL; ValueError for a bad one."""
    u = urlparse(url)
    if u.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (want {' or '.join(s + '://' for s in CLUSTER_SCHEMES)})")
    hosts = u.netloc.rpartition("@")[2]
    if u.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only")
    nodes = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def make_client(url: str, **options) -> redis.Redis:
    """A client for `url` (one Redis or, for `redis+cluster://`, a cluster), not yet connected;
    `options` go to the client (timeouts, retry)."""
    if not is_cluster_url(url):
        u = urlparse(url)
        if u.scheme in ("redis", "rediss"):  # redis-py would take a missing host or database silently
            if not u.hostname:
                raise ValueError("no host")
            if u.path.strip("/") and not u.path.strip("/").isdigit():
                raise ValueError(f"database {u.path.strip('/')!r} is not a number")
        return redis.Redis.from_url(url, **options)
    from redis.cluster import ClusterNode

    u = urlparse(url)
    nodes = [ClusterNode(host, port) for host, port in cluster_nodes(url)]
    options.pop("health_check_interval", None)  # the cluster client checks its nodes itself
    return RedisCluster(startup_nodes=nodes, username=u.username or None, password=u.password or None,
                        ssl=u.scheme == "rediss+cluster", **options)


def redis_client(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> redis.Redis:
    """A Redis client, pinged once: an unreachable server is retried with capped backoff for
    `timeout_s`; a refused login (wrong password, unknown ACL user) or a TLS mismatch fails at
    once. Later, each command retries a connection error twice with backoff; a longer outage
    reaches the caller's loop (see `pipeline.transport.service.REDIS_DOWN`)."""
    retry = Retry(ExponentialBackoff(cap=BACKOFF_MAX_S, base=BACKOFF_MIN_S), retries=COMMAND_RETRIES)
    delay, deadline = BACKOFF_MIN_S, time.monotonic() + timeout_s
    client = None
    while True:
        try:
            if client is None:  # a cluster client learns the cluster when it is made: made again until it can
                client = make_client(url, retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                     socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_S,
                                     health_check_interval=30)
            client.ping()
            return client
        except ValueError as err:
            raise ConnectError(f"Redis URL {safe_url(url)!r}: {err}") from err
        except redis.AuthenticationError as err:
            raise ConnectError(f"Redis {safe_url(url)} refused the login: {err}") from err
        except CLUSTER_DOWN as err:  # no start-up node answers, or the cluster is not ok (yet)
            if NOT_A_CLUSTER in str(err):  # a plain Redis answered: that never heals by waiting
                raise ConnectError(f"Redis {safe_url(url)} is not a cluster ({err}); use redis:// for one "
                                   "server") from err
            if time.monotonic() + delay > deadline:
                raise ConnectError(f"Redis Cluster {safe_url(url)} unavailable for {timeout_s:.0f}s: {err}") from err
            log.warning("Redis Cluster %s unavailable (%s); retrying in %.1fs", safe_url(url), err, delay)
            client = None
            time.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)
        except redis.ResponseError as err:  # NOAUTH / WRONGPASS / NOPERM come back as replies
            raise ConnectError(f"Redis {safe_url(url)} refused: {err}") from err
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if "SSL" in str(err) or "ssl" in type(err.__cause__ or err).__module__:
                raise ConnectError(f"Redis {safe_url(url)}: TLS failed ({err}); rediss:// needs a TLS port") from err
            if time.monotonic() + delay > deadline:
                refused = "refused" in str(err).lower()  # nothing listens there: TLS is not the question
                hint = "" if url.startswith("rediss") or refused else " (a TLS port needs rediss://)"
                raise ConnectError(f"Redis {safe_url(url)} unreachable for {timeout_s:.0f}s: {err}{hint}") from err
            log.warning("Redis %s unreachable (%s); retrying in %.1fs", safe_url(url), err, delay)
            time.sleep(delay)
            delay = min(BACKOFF_MAX_S, delay * 2)


def run_script_batch(client: redis.Redis, script: Script, calls: list[tuple[list[str], list]],
                     reload: tuple[Script, ...] = (), on_reload: Callable[[], None] | None = None) -> list:
    """Run `script` once per (keys, args) in one pipelined round trip (EVALSHA, with no SCRIPT
    EXISTS round trip first). When Redis has forgotten the script (NOSCRIPT: it restarted, or a
    replica took over), `script` and `reload` are loaded again and the batch is run once more, so
    every script run this way must be safe to run twice; `on_reload` is then called (before the
    second run), for what else a restarted Redis may have lost. On a cluster every key of a batch
    must be in one slot (one site's keys): the batch goes to the node that serves it."""
    if not calls:
        return []
    for attempt in (1, 2):
        with _slot_pipeline(client, calls[0][0]) as p:
            for keys, args in calls:
                p.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return p.execute()
            except NoScriptError:
                if attempt == 2:
                    raise
                log.warning("Redis forgot our Lua scripts (restarted, or a replica took over?); loading them again")
                for known in (script, *reload):
                    client.script_load(known.script)
                if on_reload is not None:
                    on_reload()
            except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, MovedError, AskError,
                    TryAgainError) as err:
                if isinstance(client, RedisCluster):  # the node is gone or no longer serves the slot: learn again
                    _refresh(client)
                    if isinstance(err, (MovedError, AskError)):
                        raise TryAgainError(f"the slot moved ({err}); retry") from err
                raise
    raise AssertionError("unreachable")


def _slot_pipeline(client: redis.Redis, keys: list[str]) -> redis.client.Pipeline:
    """A pipeline for commands on `keys`' slot: on a cluster, a plain pipeline to the node that
    serves it (redis-py's cluster pipeline would first ask a node for each EVALSHA's keys)."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(keys[0])).pipeline(transaction=False)
    return client.pipeline(transaction=False)


def _refresh(client: RedisCluster) -> None:
    """Learn the cluster's slots again (after a failover: the promoted replica)."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, RedisClusterException) as err:
        log.warning("Redis Cluster: could not learn the slots again yet: %s", err)


class Heartbeat:
    """Sets `ada:{site}:heartbeat:{role}:{id}` with a TTL every `interval_s` in a daemon thread
    (one key per site, for a service that serves several: `add_site`)."""

    def __init__(self, client: redis.Redis, site: str, role: str, sid: str, interval_s: float = 2.0,
                 info: Callable[[], dict] | None = None, healthy: Callable[[], bool] | None = None) -> None:
        self.key = names.heartbeat_key(site, role, sid)
        self.keys = [self.key]
        self.client, self.role, self.sid = client, role, sid
        self.interval_s = interval_s
        self.ttl_ms = int(3 * interval_s * 1000)  # three missed beats and the service counts as dead
        self.info, self.healthy = info, healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{sid}", daemon=True)

    def beat(self) -> None:
        body = {"role": self.role, "id": self.sid, "at": time.time(), "pid": os.getpid(), **(self.info() if self.info else {})}
        raw = json.dumps(body)
        keys = list(self.keys)  # a copy: add_site and remove_site change the list from another thread
        if len(keys) <= 1:
            if keys:
                self.client.set(keys[0], raw, px=self.ttl_ms)
            return
        # Many sites (a cloud worker with --sites): one round trip, not one a site (on a cluster,
        # one a node: every site's key is in a slot of its own, and a non-transactional pipeline
        # may span them).
        with self.client.pipeline(transaction=False) as p:
            for key in keys:
                p.set(key, raw, px=self.ttl_ms)
            p.execute()

    def add_site(self, site: str) -> None:
        """Beat at `site` too, from now on."""
        key = names.heartbeat_key(site, self.role, self.sid)
        if key not in self.keys:
            self.keys.append(key)
            self.client.set(key, json.dumps({"role": self.role, "id": self.sid, "at": time.time()}), px=self.ttl_ms)

    def remove_site(self, site: str) -> None:
        """Beat at `site` no more, and remove its key (the service left the site)."""
        key = names.heartbeat_key(site, self.role, self.sid)
        if key in self.keys:
            self.keys.remove(key)
            self.client.delete(key)

    def _run(self) -> None:
        silent = False
        while not self._stop.wait(self.interval_s):
            if self.healthy is not None and not self.healthy():
                if not silent:
                    log.error("heartbeat %s: the service's loop is not turning; not beating, so --check fails",
                              self.key)
                silent = True
                continue
            silent = False
            try:
                self.beat()
            except (redis.RedisError, RedisClusterException) as err:
                log.warning("heartbeat %s failed: %s", self.key, err)

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for key in self.keys:
            try:
                self.client.delete(key)
            except (redis.RedisError, RedisClusterException) as err:
                log.warning("could not remove heartbeat %s: %s", key, err)


def group_gone(err: redis.ResponseError) -> bool:
    """The consumer group is gone: NOGROUP, or UNBLOCKED (the stream was deleted while a read was
    blocked on it)."""
    return str(err).startswith(("NOGROUP", "UNBLOCKED"))


def alive(client: redis.Redis, site: str, role: str, sid: str | None = None) -> list[str]:
    """Ids of the services of `role` at `site` whose heartbeat has not expired (just `sid` if given).
    A heartbeat counts only as `Heartbeat` writes it: a JSON object naming its service id, with a
    capture time, under a key with a TTL. Anything else under the prefix (a rest that is no
    service id, a key of another type, one without expiry, another body: written by hand or by a
    forger) does not count: a dead service must never pass for a live one."""
    if sid:
        candidates = [sid]
    else:
        prefix = names.heartbeat_prefix(site, role)
        ids = (k.decode(errors="replace")[len(prefix):] if isinstance(k, bytes) else k[len(prefix):]
               for k in client.scan_iter(match=names.heartbeat_pattern(site, role)))
        candidates = sorted(i for i in ids if names.SERVICE_RE.match(i))
    if not candidates:
        return []
    with client.pipeline(transaction=False) as p:
        for i in candidates:
            key = names.heartbeat_key(site, role, i)
            p.get(key)
            p.pttl(key)
        replies = p.execute(raise_on_error=False)
    return [i for i, raw, ttl in zip(candidates, replies[::2], replies[1::2]) if _beats(i, raw, ttl)]


def _beats(sid: str, raw: object, ttl: object) -> bool:
    """Whether (GET, PTTL) of a heartbeat key are a live heartbeat of `sid` (see `alive`)."""
    if not isinstance(raw, (bytes, str)) or not isinstance(ttl, int) or ttl <= 0:
        return False  # missing, of another type (an error reply), or without expiry
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    at = body.get("at")
    return body.get("id") == sid and isinstance(at, (int, float)) and not isinstance(at, bool)


def check_alive(redis_url: str, site: str, role: str, sid: str | None = None) -> int:
    """Exit status for `--check`: 0 when a heartbeat of `role` (or of `sid`) is alive, else 1."""
    try:
        ids = alive(redis_client(redis_url, timeout_s=CHECK_TIMEOUT_S), site, role, sid)
    except (ConnectError, redis.RedisError) as err:
        log.error("check %s at site %r: %s", role, site, err)
        return 1
    if ids:
        log.info("%s alive at site %r: %s", role, site, ", ".join(ids))
        return 0
    log.error("no live %s at site %r", role, site)
    return 1
