"""Role processes for the replay and the benchmarks: `ada-ddnn edge|cloud|cameras` started as
separate OS processes, as deployed (no shared GIL), each logging to a file, waited on by its
heartbeat and stopped with SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import redis

from pipeline.errors import ReplayError
from pipeline.transport.redis_client import alive

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # a role that has not exited this long after SIGTERM is killed


@dataclass
class RoleProcess:
    """One `ada-ddnn ROLE ...` child process and its log file."""

    name: str
    argv: list[str]
    log_path: str
    proc: subprocess.Popen = field(repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, signalled: bool = False) -> int:
        """SIGTERM (unless `signalled` already), then SIGKILL after `timeout_s`; the exit status
        (negative: killed by a signal). One SIGTERM only: a second one arriving while the
        interpreter shuts down, its handlers gone, would kill a process that was exiting cleanly."""
        if self.alive():
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s of SIGTERM; killing it. Its log:\n%s", self.name, timeout_s,
                          self.tail())
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_role(role: str, args: list[str], log_dir: str, name: str, env: dict[str, str] | None = None) -> RoleProcess:
    """Start `ada-ddnn role *args` (with `env` added) with its output in `log_dir/name.log`."""
    argv = [sys.executable, "-m", "pipeline.orchestration.cli", role, *args]
    path = os.path.join(log_dir, f"{name}.log")
    with open(path, "wb") as out:  # the child keeps its own descriptor
        # A session of its own: a terminal's Ctrl-C reaches the replay alone, which stops its
        # roles in order (cameras first) and its brokers last, instead of all at once.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return RoleProcess(name, argv, path, proc)


def wait_alive(r: redis.Redis, site: str, role: str, procs: list[RoleProcess], timeout_s: float = 120.0) -> None:
    """Until every process of `procs` (all of `role`) beats at `site`; ReplayError with the log of
    one that died or stayed silent."""
    end = time.monotonic() + timeout_s
    while len(alive(r, site, role)) < len(procs):
        for p in procs:
            if not p.alive():
                raise ReplayError(f"{p.name} exited with status {p.proc.returncode} while starting:\n{p.tail()}")
        if time.monotonic() > end:
            raise ReplayError(f"{role}: {len(alive(r, site, role))} of {len(procs)} alive after {timeout_s:.0f} s; "
                              f"last log lines of {procs[-1].name}:\n{procs[-1].tail()}")
        time.sleep(0.1)  # heartbeats are Redis keys: nothing to wait on but the next look


def stop_all(procs: list[RoleProcess]) -> dict[str, int]:
    """Stop every process (SIGTERM to all first, so they drain in parallel); name -> exit status."""
    for p in procs:
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
    return {p.name: p.stop(signalled=True) for p in procs}
