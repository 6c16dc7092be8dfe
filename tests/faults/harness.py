"""Fault-injection harness for the streaming pipeline, run as real processes.

- `Mosquitto` and `RedisServer`: PRIVATE brokers (subprocesses on free loopback ports) that a
  test can SIGKILL, SIGSTOP/SIGCONT and restart on the same port.
- `RedisClusterServers`: a private Redis Cluster (masters with replicas, one `redis-server
  --cluster-enabled yes` per node), whose masters a test can SIGKILL and whose failover it awaits.
- `Role`: one real `ada-ddnn` role process (cameras, edge, cloud), its stdout/stderr in files.
- `Collector`: a thread that follows the site's results, dead-letter and losses streams, so that
  what was recorded before a Redis restart without persistence is still counted.
- `account()`: frames captured / decided / duplicates / dead-lettered / shed (named in
  `ada:{site}:losses` by the cameras' ShedNotices) / unexplained losses (captured - decided -
  dead-lettered - shed).
- `Harness`: all of it for one test, with one fresh site id; `finish()` checks that the role
  processes are alive, then stops them with SIGTERM and checks their exit status.

Every wait is a bounded polling loop on an event (a port accepting, a log line, a count of
results); the only fixed sleeps are the outages themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import redis
from redis.exceptions import RedisClusterException

from pipeline.transport.redis_client import make_client
from pipeline.wire import names
from pipeline.wire.messages import Decision, MessageError, unpack

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0  # a broker that does not accept connections by then failed
ROLE_READY_S = 60.0  # a role process that has not logged its readiness by then failed (2 busy cores)
STOP_TIMEOUT_S = 30.0  # SIGTERM -> exit bound (the edge drains for up to 5 s, the cameras wait for PUBACKs)


def ada_ddnn() -> list[str]:
    """The `ada-ddnn` console script of this interpreter's environment (else `python -m` its CLI)."""
    exe = Path(sys.executable).with_name("ada-ddnn")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ada-ddnn")
    return [found] if found else [sys.executable, "-m", "pipeline.orchestration.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(pred: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05,
               abort: Callable[[], str | None] | None = None):
    """Poll `pred` until it returns something truthy (returned), or fail after `timeout_s`.
    `abort()` returning a text fails at once (a process that died while we wait)."""
    end = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if abort is not None and (why := abort()):
            raise AssertionError(f"while waiting for {what}: {why}")
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no file)"
    return text if len(text) <= chars else "...\n" + text[-chars:]


# --- brokers ------------------------------------------------------------------------------

class Server:
    """A broker subprocess on a fixed port that survives kill/restart cycles."""

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.starts = 0
        self.events: list[tuple[float, str]] = []  # (time.time(), what) of every fault injected

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Server:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        proc = self.proc
        wait_until(lambda: port_accepts(self.port), START_TIMEOUT_S, f"{self.name} on port {self.port}",
                   abort=lambda: None if proc.poll() is None else
                   f"{self.name} exited with {proc.returncode}:\n{_tail(self.log_path, 2000)}")
        self.events.append((time.time(), f"start #{self.starts}"))
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        assert self.proc is not None
        self.events.append((time.time(), "SIGKILL"))
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections (the kernel's backlog), nothing answers."""
        assert self.alive
        self.events.append((time.time(), "SIGSTOP"))
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.events.append((time.time(), "SIGCONT"))
        self.proc.send_signal(signal.SIGCONT)

    def restart(self, down_s: float = 0.0) -> float:
        """Kill (if running), stay down `down_s` seconds (the outage itself), start again on the
        same port; returns time.time() when it accepts connections again."""
        if self.alive:
            self.kill()
        if down_s > 0:
            time.sleep(down_s)  # the outage
        self.start()
        return time.time()

    def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return _tail(self.log_path)


class Mosquitto(Server):
    """Private Mosquitto: persistence on disk, generous queues, anonymous, loopback only."""

    name = "mosquitto"

    def __init__(self, workdir: Path, port: int | None = None, autosave_interval_s: int = 1,
                 max_queued: int = 1_000_000) -> None:
        super().__init__(workdir, port)
        self.conf = workdir / "mosquitto.conf"
        data = workdir / "data"
        data.mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "user root\n"  # as root, Mosquitto would otherwise switch to the `mosquitto` user
            "persistence true\n"
            f"persistence_location {data}/\n"
            f"autosave_interval {autosave_interval_s}\n"
            f"max_queued_messages {max_queued}\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 100\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages true\n")

    def argv(self) -> list[str]:
        return [shutil.which("mosquitto") or "mosquitto", "-c", str(self.conf)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class RedisServer(Server):
    """Private Redis: no RDB snapshots; AOF (everysec) when `appendonly`."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = True) -> None:
        super().__init__(workdir, port)
        self.appendonly = appendonly

    def argv(self) -> list[str]:
        return [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--dir", str(self.workdir), "--protected-mode", "yes", "--logfile", ""]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class InContainer:
    """Mixin: the same server, run in a container (host networking, its port on 127.0.0.1) from
    the images `scripts/docker-engine.sh` builds. The work folder is mounted at the same path, so
    the config, the persistence files and the AOF live where the process variant keeps them and
    survive `docker kill` + `docker start` of the same container. Faults map one to one: SIGKILL
    is `docker kill`, SIGSTOP/SIGCONT are `docker pause`/`unpause` (the cgroup freezer)."""

    image = ""
    container: str | None = None

    def _docker(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {args[0]} ({self.name}): {done.stderr.strip()[-800:]}")
        return done.stdout.strip()

    def start(self) -> Server:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        if self.container is None:
            argv = [os.path.basename(a) if i == 0 else a for i, a in enumerate(self.argv())]
            self.container = self._docker("run", "-d", "--network", "host", "--user", "0",
                                          "-v", f"{self.workdir}:{self.workdir}", "-w", str(self.workdir),
                                          self.image, *argv)
        else:
            self._docker("start", self.container)
        wait_until(lambda: port_accepts(self.port), START_TIMEOUT_S, f"{self.name} container on port {self.port}",
                   abort=lambda: None if self.alive else f"{self.name} container exited:\n{self.log()}")
        self.events.append((time.time(), f"start #{self.starts} (container)"))
        return self

    @property
    def alive(self) -> bool:
        if self.container is None:
            return False
        state = self._docker("inspect", "-f", "{{.State.Running}} {{.State.Paused}}", self.container, check=False)
        return state.startswith("true")

    def kill(self) -> None:
        assert self.container is not None
        self.events.append((time.time(), "SIGKILL (docker kill)"))
        self._docker("kill", self.container)

    def pause(self) -> None:
        assert self.alive
        self.events.append((time.time(), "SIGSTOP (docker pause)"))
        self._docker("pause", self.container)

    def resume(self) -> None:
        assert self.container is not None
        self.events.append((time.time(), "SIGCONT (docker unpause)"))
        self._docker("unpause", self.container)

    def terminate(self) -> None:
        if self.container is not None:
            self._docker("unpause", self.container, check=False)
            self._docker("rm", "-f", self.container, check=False)
            self.container = None

    def log(self) -> str:
        if self.container is None:
            return ""
        done = subprocess.run(["docker", "logs", "--tail", "60", self.container], capture_output=True, text=True,
                              timeout=60)
        return (done.stdout + done.stderr)[-6000:]


class MosquittoContainer(InContainer, Mosquitto):
    image = "ada-ddnn/mosquitto:local"

    def argv(self) -> list[str]:
        return ["stdbuf", "-oL", "mosquitto", "-c", str(self.conf)]  # Debian's build buffers a piped log


class RedisContainer(InContainer, RedisServer):
    image = "ada-ddnn/redis:local"


def broker_containers() -> bool:
    """Whether the fault tests run their brokers in containers: when a Docker engine answers and
    the local images exist (env ADA_DDNN_FAULT_BROKERS=process|container forces one or the other)."""
    want = os.environ.get("ADA_DDNN_FAULT_BROKERS", "")
    if want == "process":
        return False
    from tests import containers

    ok = containers.docker_answers() and all(
        containers.image_present(image) for image in (MosquittoContainer.image, RedisContainer.image))
    if want == "container" and not ok:
        raise RuntimeError("ADA_DDNN_FAULT_BROKERS=container, and no engine answers or the images are missing")
    return ok


class ClusterNode(RedisServer):
    """One node of a private Redis Cluster: cluster mode on, its bus on a port of its own, no
    persistence (a restarted node would come back empty: the tests kill, they do not restart)."""

    name = "redis-node"

    def __init__(self, workdir: Path, node_timeout_ms: int) -> None:
        super().__init__(workdir, appendonly=False)
        self.bus_port = free_port()
        self.node_timeout_ms = node_timeout_ms

    def argv(self) -> list[str]:
        return [*super().argv(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(self.node_timeout_ms)]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)


class RedisClusterServers:
    """A private Redis Cluster of `masters` masters with `replicas` replicas each: one
    `redis-server --cluster-enabled yes` per node on free loopback ports, joined with
    `redis-cli --cluster create`. `url` is the `redis+cluster://` URL the roles take."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.nodes = [ClusterNode(workdir / f"node{i}", node_timeout_ms) for i in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 60.0) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        made = subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                               *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas",
                               str(self.replicas), "--cluster-yes"], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
        assert made.returncode == 0, f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}"
        wait_until(self.ready, timeout_s, "the cluster to be ok on every node with every replica in sync",
                   interval_s=0.1)
        return self

    @staticmethod
    def _info(node: ClusterNode, section: str) -> dict:
        with node.client() as c:
            return c.execute_command("CLUSTER INFO") if section == "cluster" else c.info(section)

    def ready(self) -> bool:
        """Every live node says cluster_state:ok and knows every node, and every live replica's
        link to its master is up."""
        try:
            for node in self.live():
                info = self._info(node, "cluster")
                if info.get("cluster_state") != "ok":
                    return False
                replication = self._info(node, "replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
            return True
        except redis.RedisError:
            return False

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def master_of(self, key: str) -> ClusterNode:
        """The node that serves `key`'s slot now, as a live node sees it."""
        with self.live()[0].client() as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no node serves the slot of {key!r}")

    def wait_promoted(self, dead: ClusterNode, key: str, timeout_s: float = 30.0) -> ClusterNode:
        """Until a replica of `dead` (killed) serves `key`'s slot and the cluster is ok again."""
        def promoted():
            try:
                node = self.master_of(key)
            except (redis.RedisError, StopIteration):
                return None
            return node if node is not dead and node.alive and self.ready() else None
        return wait_until(promoted, timeout_s, f"a replica of the killed master :{dead.port} to take over",
                          interval_s=0.05)

    def terminate(self) -> None:
        for node in self.nodes:
            node.terminate()


# --- role processes -----------------------------------------------------------------------

def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):  # argparse BooleanOptionalAction: --flag / --no-flag
            out.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def role_env() -> dict[str, str]:
    """This environment without any ADA_DDNN_* variable (a CI setting must not leak into a role),
    one torch thread per process (2 cores, several processes), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADA_DDNN_")}
    env.update(ADA_DDNN_THREADS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


class Role:
    """One `ada-ddnn` role process; output in `<workdir>/<name>.out|.err`."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name, self.args, self.workdir = name, args, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        self.proc: subprocess.Popen | None = None
        self.killed = False  # SIGKILLed on purpose by the test
        self.started_at = 0.0

    def start(self) -> Role:
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen([*ada_ddnn(), *self.args], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=role_env(), cwd=self.workdir)
        self.started_at = time.time()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def text(self) -> str:
        return _tail(self.err_path, 10**9) + _tail(self.out_path, 10**9)

    def died(self) -> str | None:
        """Why waiting on this process is pointless: it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.err_path, 3000)}"
        return None

    def wait_log(self, pattern: str, timeout_s: float = ROLE_READY_S) -> None:
        rx = re.compile(pattern)
        wait_until(lambda: rx.search(self.text()), timeout_s, f"{self.name} to log /{pattern}/", interval_s=0.1,
                   abort=self.died)

    def kill(self) -> None:
        assert self.alive, self.died()
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait; None if it did not exit within `timeout_s` (then it is killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def rss_kb(self) -> int:
        """VmRSS of the process (kB), from /proc/<pid>/status."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {self.name}")

    def service_id(self) -> str | None:
        """The service id the edge or cloud logged when it connected."""
        m = re.search(r"\b(?:edge|cloud) (\S+): site", self.text())
        return m.group(1) if m else None

    def heartbeat(self, r: redis.Redis, site: str, role: str) -> dict | None:
        """The role's last heartbeat body, or None."""
        sid = self.service_id()
        raw = r.get(names.heartbeat_key(site, role, sid)) if sid else None
        return json.loads(raw) if raw else None


# --- following the results --------------------------------------------------------------

class Collector(threading.Thread):
    """Follows `ada:{site}:results`, `:deadletter` and `:losses` with XREAD, riding out broker
    outages; keeps every entry by id, so what a Redis restart without persistence loses is still
    counted as recorded."""

    def __init__(self, redis_url: str, site: str) -> None:
        super().__init__(name=f"collector-{site}", daemon=True)
        self.url, self.site = redis_url, site
        self.streams = {names.results_stream(site): "0-0", names.deadletter_stream(site): "0-0",
                        names.losses_stream(site): "0-0"}
        self.results: dict[bytes, tuple[int, Decision | None, float]] = {}  # entry id -> (frame, decision, seen at)
        self.dead: dict[bytes, dict] = {}
        self.losses: dict[bytes, dict] = {}  # named losses: frames cameras shed (ShedNotices the edge recorded)
        self.cond = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        r = None
        while not self._halt.is_set():
            try:
                if r is None:
                    r = make_client(self.url, socket_timeout=3, socket_connect_timeout=1)
                resp = r.xread(dict(self.streams), block=200, count=2000)
                self._take(resp or [])
            except (redis.RedisError, RedisClusterException):
                if r is not None:
                    r.close()
                r = None
                self._halt.wait(0.1)  # the broker is away: try again shortly
        if r is not None:
            r.close()

    def _take(self, resp) -> None:
        now = time.time()
        with self.cond:
            for stream, entries in resp:
                stream = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, f in entries:
                    self.streams[stream] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    if stream == names.results_stream(self.site):
                        self._result(entry_id, f, now)
                    elif stream == names.losses_stream(self.site):
                        self.losses[entry_id] = f
                    else:
                        self.dead[entry_id] = f
            self.cond.notify_all()

    def _result(self, entry_id: bytes, f: dict, now: float) -> None:
        try:
            dec = Decision.decode(f[b"msg"])
        except (MessageError, KeyError):
            dec = None
        frame = int(f[b"frame"]) if b"frame" in f else (dec.frame_id if dec else -1)
        self.results[entry_id] = (frame, dec, now)

    def take_final(self, r: redis.Redis) -> None:
        """Merge a last full read of both streams (what is still in Redis now)."""
        for stream in self.streams:
            self._take([(stream, r.xrange(stream))])

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    # queries
    def decided_frames(self, frames: Iterable[int] | None = None) -> set[int]:
        with self.cond:
            got = {fr for fr, _, _ in self.results.values()}
        return got if frames is None else got & set(frames)

    def decisions(self) -> list[Decision]:
        with self.cond:
            return [d for _, d, _ in self.results.values() if d is not None]

    def wait_decided(self, frames: Iterable[int], n: int | None, timeout_s: float, what: str,
                     abort: Callable[[], str | None] | None = None) -> set[int]:
        frames = set(frames)
        need = len(frames) if n is None else n
        return wait_until(lambda: (got := self.decided_frames(frames)) and len(got) >= need and got, timeout_s,
                          f"{need} decided frames ({what})", abort=abort)


def dead_letter_frame(f: dict) -> int | None:
    """The frame a dead letter names: its source ("frame N"), its reason ("... frame N ..."), or
    the frame_id in its payload when that still unpacks."""
    source = f.get(b"source", b"").decode(errors="replace")
    m = re.fullmatch(r"frame (\d+)", source)
    if m:
        return int(m.group(1))
    m = re.search(r"\bframe (\d+)\b", f.get(b"reason", b"").decode(errors="replace"))
    if m:
        return int(m.group(1))
    payload = f.get(b"payload", b"")
    try:
        obj = unpack(payload)  # either wire form, as its named map
    except MessageError:
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - garbage stays garbage
            return None
    if isinstance(obj, dict) and type(obj.get("frame_id")) is int:
        return obj["frame_id"]
    return None


@dataclass
class Accounting:
    captured: int
    decided: int  # distinct frames of the captured range with a result
    duplicates: int  # result entries beyond one per frame (any frame)
    dead_lettered: int  # frames of the range without a result that a dead letter names
    shed: int  # frames of the range without a result named in `ada:{site}:losses` (cameras shed them)
    lost: int  # unexplained: captured - decided - dead-lettered - shed
    lost_ids: list[int]
    incomplete: int  # decided with fewer cameras than all six
    exits: dict[str, int]
    outside: int  # frames with a result outside the captured range
    dead_letters: int  # dead-letter entries in all
    counters: dict[str, int] = field(default_factory=dict)

    def line(self, label: str = "") -> str:
        return (f"ACCOUNTING {label}: captured={self.captured} decided={self.decided} duplicates={self.duplicates} "
                f"dead_lettered={self.dead_lettered} shed={self.shed} lost={self.lost} incomplete={self.incomplete} exits={self.exits} "
                f"outside_range={self.outside} dead_letters={self.dead_letters} lost_ids={self.lost_ids[:20]} "
                f"counters={self.counters}")

    def assert_clean(self) -> None:
        assert self.lost == 0, f"{self.lost} frames lost without explanation: {self.lost_ids[:20]}"
        assert self.duplicates == 0, f"{self.duplicates} duplicate results"


def account(collector: Collector, r: redis.Redis | None, site: str, frames: Iterable[int],
            num_cameras: int = 6) -> Accounting:
    frames = list(frames)
    want = set(frames)
    counters: dict[str, int] = {}
    if r is not None:
        collector.take_final(r)
        counters = {k.decode(): int(v) for k, v in r.hgetall(names.counters_key(site)).items()}
    with collector.cond:
        results = list(collector.results.values())
        dead = list(collector.dead.values())
        losses = list(collector.losses.values())
    per_frame = Counter(fr for fr, _, _ in results)
    decided = want & set(per_frame)
    named = {fr for fr in (dead_letter_frame(f) for f in dead) if fr is not None}
    dead_lettered = (want - decided) & named
    shed = (want - decided - dead_lettered) & {int(f[b"frame"]) for f in losses if b"frame" in f}
    lost_ids = sorted(want - decided - dead_lettered - shed)
    first: dict[int, Decision] = {}
    for fr, dec, _ in results:
        if dec is not None and fr in want:
            first.setdefault(fr, dec)
    exits = Counter(d.exit for d in first.values())
    return Accounting(
        captured=len(want), decided=len(decided), duplicates=sum(n - 1 for n in per_frame.values()),
        dead_lettered=len(dead_lettered), shed=len(shed), lost=len(lost_ids), lost_ids=lost_ids,
        incomplete=sum(len(d.present) < num_cameras for d in first.values()), exits=dict(exits),
        outside=len(set(per_frame) - want), dead_letters=len(dead), counters=counters)


# --- one test's world ---------------------------------------------------------------------

class Harness:
    """Private brokers, role processes and accounting for one test (one fresh site)."""

    def __init__(self, tmp_path: Path, checkpoint: str, data_dir: str, label: str = "") -> None:
        self.tmp = tmp_path
        self.checkpoint, self.data_dir = checkpoint, data_dir
        self.site = "f-" + re.sub(r"[^A-Za-z0-9]", "-", label)[:30] + "-" + uuid.uuid4().hex[:6]
        self.mqtt: Mosquitto | None = None
        self.redis: RedisServer | None = None
        self.redis_url = ""  # the private Redis's, or a cluster's (`use_cluster`)
        self.collectors: list[Collector] = []  # one per site of a many-site test (`follow`)
        self.roles: list[Role] = []
        self.collector: Collector | None = None
        self._admin: redis.Redis | None = None
        self._names = Counter()

    # brokers
    def start_brokers(self, appendonly: bool = True, mqtt_autosave_s: int = 1) -> Harness:
        mq_cls, rd_cls = (MosquittoContainer, RedisContainer) if broker_containers() else (Mosquitto, RedisServer)
        self.mqtt = mq_cls(self.tmp / "mosquitto", autosave_interval_s=mqtt_autosave_s).start()
        self.redis = rd_cls(self.tmp / "redis", appendonly=appendonly).start()
        self.redis_url = self.redis.url
        self.collector = Collector(self.redis.url, self.site)
        self.collector.start()
        return self

    def use_cluster(self, cluster: RedisClusterServers) -> Harness:
        """A private Mosquitto and a Redis Cluster the caller started (and stops)."""
        self.mqtt = Mosquitto(self.tmp / "mosquitto").start()
        self.redis_url = cluster.url
        return self

    def follow(self, site: str) -> Collector:
        """A collector of `site`'s results, dead letters and losses (stopped by `close`)."""
        collector = Collector(self.redis_url, site)
        collector.start()
        self.collectors.append(collector)
        return collector

    def admin(self) -> redis.Redis:
        """A plain client for the test's own reads and writes (short timeouts)."""
        if self._admin is None:
            self._admin = make_client(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        return self._admin

    def wait_redis(self, timeout_s: float = 20.0) -> None:
        """Until Redis answers PING (after a restart it may be LOADING its AOF)."""
        def ping():
            try:
                return self.admin().ping()
            except redis.RedisError:
                return False
        wait_until(ping, timeout_s, "Redis to answer PING")

    # roles
    def _role(self, kind: str, name: str | None, args: list[str]) -> Role:
        self._names[kind] += 1
        name = name or (kind if self._names[kind] == 1 else f"{kind}{self._names[kind]}")
        role = Role(name, args, self.tmp / "roles")
        self.roles.append(role)
        return role.start()

    def edge(self, name: str | None = None, wait: bool = True, site: str | None = None, **options) -> Role:
        opts = {"claim_lease_ms": 3000, "device": "cpu", **options}
        role = self._role("edge", name, ["edge", "--checkpoint", self.checkpoint, "--mqtt-url", self.mqtt.url,
                                         "--redis-url", self.redis_url, "--site", site or self.site, *_flags(opts)])
        if wait:
            role.wait_log(r"edge \S+: site .* subscribed")
        return role

    def cloud(self, name: str | None = None, wait: bool = True, **options) -> Role:
        opts = {"device": "cpu", "claim_idle_ms": 3000, "claim_interval_s": 1, **options}
        role = self._role("cloud", name, ["cloud", "--checkpoint", self.checkpoint, "--mqtt-url", self.mqtt.url,
                                          "--redis-url", self.redis_url, "--site", self.site, *_flags(opts)])
        if wait:
            role.wait_log(r"cloud \S+: site .* group")
        return role

    def cameras(self, start: int, stop: int, fps: float, name: str | None = None, site: str | None = None,
                **options) -> Role:
        return self._role("cameras", name, ["cameras", "--checkpoint", self.checkpoint, "--data", self.data_dir,
                                            "--start", str(start), "--stop", str(stop), "--fps", str(fps),
                                            "--mqtt-url", self.mqtt.url, "--site", site or self.site,
                                            *_flags(options)])

    def dead_roles(self) -> str | None:
        """Text naming a role process that died without the test killing it (for `abort=`)."""
        for role in self.roles:
            if role.killed or role.name.startswith("cameras"):
                continue
            if (why := role.died()) is not None:
                return why
        for role in self.roles:
            if role.name.startswith("cameras") and role.returncode() not in (None, 0):
                return role.died()
        return None

    # accounting
    def account(self, frames: Iterable[int], label: str = "") -> Accounting:
        acc = account(self.collector, self._admin_or_none(), self.site, frames)
        print(acc.line(label or self.site), flush=True)
        return acc

    def _admin_or_none(self) -> redis.Redis | None:
        try:
            self.admin().ping()
            return self.admin()
        except redis.RedisError:
            return None

    def wait_decided(self, frames: Iterable[int], timeout_s: float, what: str = "", n: int | None = None) -> set[int]:
        return self.collector.wait_decided(frames, n, timeout_s, what or self.site, abort=self.dead_roles)

    def wait_settled(self, frames: Iterable[int], timeout_s: float, quiet_s: float = 1.5) -> None:
        """Until every frame of `frames` is decided or named (dead letter, shed), then until no new
        result or dead letter arrived for `quiet_s` (late duplicates would show up then)."""
        frames = set(frames)

        def settled():
            acc = account(self.collector, None, self.site, frames)
            return acc.lost == 0
        try:
            wait_until(settled, timeout_s, f"all {len(frames)} frames decided or named", interval_s=0.1,
                       abort=self.dead_roles)
        except AssertionError as err:
            acc = account(self.collector, self._admin_or_none(), self.site, frames)
            states = "\n".join(f"frame {f}: {self.frame_state(f)}" for f in acc.lost_ids[:5])
            raise AssertionError(f"{err}\n{acc.line('at the timeout')}\n{states}") from None
        finally:
            last, since = -1, time.monotonic()
            end = time.monotonic() + 10
            while time.monotonic() < end:
                n = len(self.collector.results) + len(self.collector.dead) + len(self.collector.losses)
                if n != last:
                    last, since = n, time.monotonic()
                elif time.monotonic() - since >= quiet_s:
                    break
                time.sleep(0.1)

    def frame_state(self, frame_id: int) -> dict:
        """Where a frame stands in Redis (for the diagnosis of a frame that went missing)."""
        try:
            r, site = self.admin(), self.site
            keys = {kind: names.per_frame_key(site, kind, frame_id) for kind in names.FRAME_KINDS}
            out = {kind: r.type(key).decode() for kind, key in keys.items()}
            out["owner"] = r.get(keys[names.DECIDED])
            out["pending_deadline"] = r.zscore(names.pending_key(site), frame_id)
            out["lease_until"] = r.zscore(names.claimed_key(site), frame_id)
            out["cameras"] = sorted(int(k) for k in r.hkeys(keys[names.FRAME]) + r.hkeys(keys[names.CLAIMED]))
            out["in_escalations"] = any(int(f.get(b"frame", -1)) == frame_id
                                        for _, f in r.xrange(names.escalations_stream(site)))
            return out
        except redis.RedisError as err:
            return {"error": str(err)}

    def resume_seconds(self, since: float, timeout_s: float = 10.0) -> float:
        """Seconds from `since` (time.time()) to the first decision of a frame captured after it."""
        def first():
            later = [d.decided_at for d in self.collector.decisions() if d.captured_at > since]
            return min(later) if later else None
        at = wait_until(first, timeout_s, f"a decision for a frame captured after t={since:.1f}", interval_s=0.05,
                        abort=self.dead_roles)
        return at - since

    # the end
    def finish(self, must_live: list[Role], cameras: list[Role] = (), timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Assert each of `must_live` is still running and each camera process finished with 0
        (or still runs); then SIGTERM them all and assert they exit 0 within `timeout_s`."""
        dead = [r.died() for r in must_live if not r.alive]
        assert not dead, "role processes died:\n" + "\n".join(dead)
        for cam in cameras:
            rc = cam.returncode()
            assert rc in (None, 0), f"{cam.name} exited with {rc}:\n{_tail(cam.err_path, 3000)}"
        codes = {}
        for role in [*must_live, *cameras]:
            if role.alive:
                t0 = time.monotonic()
                codes[role.name] = (role.terminate(timeout_s), round(time.monotonic() - t0, 1))
        print(f"STOPPED (exit code, seconds): {codes}", flush=True)
        bad = {k: v for k, v in codes.items() if v[0] != 0}
        assert not bad, f"roles did not exit 0 within {timeout_s:.0f} s of SIGTERM: {bad}\n" + \
            "\n".join(_tail(r.err_path, 3000) for r in self.roles if r.name in bad)

    def close(self) -> None:
        for role in self.roles:
            if role.alive:
                role.terminate(timeout_s=5)
        for collector in [self.collector, *self.collectors]:
            if collector is not None:
                collector.stop()
        if self._admin is not None:
            self._admin.close()
        for server in (self.mqtt, self.redis):
            if server is not None:
                server.terminate()

    def logs(self) -> str:
        parts = []
        for role in self.roles:
            parts.append(f"----- {role.name} (pid {role.proc.pid if role.proc else '-'}, "
                         f"rc {role.returncode()}, args {' '.join(role.args[:1])}) stderr -----\n"
                         f"{_tail(role.err_path)}\n----- {role.name} stdout -----\n{_tail(role.out_path, 2000)}")
        for server in (self.mqtt, self.redis):
            if server is not None:
                parts.append(f"----- {server.name} (events {server.events}) -----\n{_tail(server.log_path, 3000)}")
        return "\n".join(parts)


# --- publishing what no camera would ------------------------------------------------------

class Publisher:
    """An MQTT v5 client of the test's own, publishing whatever it is given (QoS 1 by default)."""

    def __init__(self, mqtt_url: str, client_id: str = "") -> None:
        import paho.mqtt.client as mqtt

        from pipeline.transport.mqtt_client import parse_mqtt_url

        u = parse_mqtt_url(mqtt_url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=client_id or f"fault-{uuid.uuid4().hex[:8]}")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(u.host, u.port, keepalive=30)
        self.client.loop_start()
        self.infos: list = []
        if not connected.wait(10):
            self.close(0)
            raise AssertionError(f"no MQTT session with {mqtt_url}")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=qos))

    def close(self, timeout_s: float = 60.0) -> int:
        """Wait until the broker acknowledged every publish (QoS 1), disconnect; how many were sent."""
        try:
            end = time.monotonic() + timeout_s
            for info in self.infos:
                info.wait_for_publish(max(0.1, end - time.monotonic()))
                assert info.is_published(), "the broker did not acknowledge a publish in time"
            return len(self.infos)
        finally:
            self.client.disconnect()
            self.client.loop_stop()


def publish_raw(mqtt_url: str, messages: Iterable[tuple[str, bytes]], qos: int = 1, timeout_s: float = 60.0) -> int:
    """Publish (topic, payload) pairs and wait until the broker acknowledged them all."""
    pub = Publisher(mqtt_url)
    for topic, payload in messages:
        pub.publish(topic, payload, qos)
    return pub.close(timeout_s)
