"""`ada-ddnn bench stream`: the streaming pipeline's limits on this machine, measured in one run.

    ada-ddnn bench stream --json runs/bench_stream.json --png docs/figures/bench_stream.png --doc docs/BENCHMARKS.md

Everything runs against a private Mosquitto and Redis started for the run (loopback, free ports):

- compute: the same network in one process, no transport: the six cameras alone, and the whole
  adaptive path (cameras, edge block for frames not leaving at exit 1, cloud for escalations),
  batched and frame by frame;
- broker: a paho QoS 1 publisher process to a subscriber process, messages of an observation's
  size, no model;
- edge: a load generator process publishing observations encoded beforehand (so camera compute
  never limits it) at stepped rates into one edge process (and one cloud worker): the highest
  rate it holds (decides >= 95% of what is offered, nothing shed), its fraction of the broker
  ceiling, then twice that rate offered (it must saturate, not collapse: the rest is shed and
  named), and a top-10 profile of the edge at its limit;
- end to end: replays with cameras, edge and cloud as processes at stepped --fps; the highest
  sustainable rate, and capture-to-decision latency per exit path at 50% and 90% of it;
- scaling: 1, 2 and 4 aggregators with 1 and 2 cloud workers, at full speed;
- memory: each process's RSS at the start and end of a long load-generator run (--soak-frames).

Every run checks lost = 0 (each frame decided or named) and duplicates = 0.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import torch

from edge.fusion import fuse
from pipeline.checkpoint import thresholds
from pipeline.compute import set_threads
from pipeline.config import default_data_dir
from pipeline.data import load_cifar10, to_float
from pipeline.entropy import normalized_entropy
from pipeline.errors import ReplayError
from pipeline.layers import forward_rows
from pipeline.offline.network import AdaDDNN, load_checkpoint, prepare_views
from pipeline.orchestration.loadgen import write_templates
from pipeline.orchestration.replay import ReplayConfig, run_replay
from pipeline.orchestration.roles import RoleProcess, start_role, stop_all, wait_alive
from pipeline.settings import check_fields
from pipeline.transport.embedded import embedded_services
from pipeline.transport.redis_client import redis_client
from pipeline.wire import names
from pipeline.wire.messages import CameraObservation, Decision, FeatureTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamBenchConfig:
    """What `bench stream` measures and for how long."""

    checkpoint: str = "models/ada.safetensors"  # the network whose observations and decisions are streamed
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    templates: int = field(default=512, metadata={"min": 1, "max": 10_000})  # distinct real observations (test frames) the load generator cycles through
    step_s: float = field(default=6.0, metadata={"above": 0, "max": 3600})  # seconds each offered rate lasts
    edge_rates: tuple[int, ...] = field(default=(200, 400, 600, 800, 1000, 1300, 1600, 2000), metadata={"min": 1, "max": 1_000_000})  # frames/s offered to the edge, stepped up until it stops holding
    replay_fps: tuple[int, ...] = field(default=(60, 100, 140, 180, 220, 260), metadata={"min": 1, "max": 1_000_000})  # end-to-end rates tried, stepped up until one is not sustained
    broker_messages: int = field(default=20_000, metadata={"min": 1, "max": 100_000_000})  # messages the broker-ceiling run sends
    aggregators: tuple[int, ...] = field(default=(1, 2, 4), metadata={"min": 1, "max": 64})  # aggregator counts of the scaling runs (each with every worker count)
    workers: tuple[int, ...] = field(default=(1, 2), metadata={"min": 1, "max": 64})  # cloud worker counts of the scaling runs
    scaling_frames: int = field(default=1500, metadata={"min": 1, "max": 10_000})  # frames each scaling replay streams (the test split has 10,000)
    soak_frames: int = field(default=0, metadata={"min": 0, "max": 100_000_000})  # frames of the memory run (0 = skip it; the release figure used 100,000)
    soak_fps: int = field(default=0, metadata={"min": 0, "max": 1_000_000})  # its offered rate; 0 = 80% of the edge's measured capacity

    def __post_init__(self) -> None:
        check_fields(self)  # ranges, as declared on the fields
        for name in ("edge_rates", "replay_fps", "aggregators", "workers"):
            if not getattr(self, name):
                raise ValueError(f"{name}: at least one value")


# --- compute ceiling -----------------------------------------------------------------------

@torch.no_grad()
def compute_ceiling(model: AdaDDNN, scenes: torch.Tensor, t1: float | None, t2: float, batch: int = 64) -> dict:
    """Frames/s of the network alone: the cameras, and the adaptive path, batched and one by one."""
    def cameras(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.run_cameras(prepare_views(model.cfg, x))

    def adaptive(x: torch.Tensor) -> None:
        feats, cam_logits = cameras(x)
        n = x.shape[0]
        rest = torch.ones(n, dtype=torch.bool)
        if cam_logits is not None and t1 is not None:
            rest &= ~(normalized_entropy(cam_logits).min(dim=1).values < t1)
        if rest.any():
            present = torch.ones(int(rest.sum()), feats.shape[1], dtype=torch.bool)
            fused = fuse(feats[rest], present, model.cfg.fusion)
            edge_logits = forward_rows(model.edge, fused)
            up = normalized_entropy(edge_logits) >= t2
            if up.any():
                forward_rows(model.cloud, fused[up])

    def rate(fn, size: int) -> float:
        size = min(size, len(scenes))  # fewer --templates than a batch: batches of all of them
        fn(scenes[:size])  # warm-up
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            for i in range(0, len(scenes) - size + 1, size):
                fn(scenes[i:i + size])
                done += size
        return done / (time.perf_counter() - t0)

    return {"cameras_batched_fps": rate(cameras, batch), "adaptive_batched_fps": rate(adaptive, batch),
            "adaptive_one_by_one_fps": rate(adaptive, 1), "batch": min(batch, len(scenes)), "threads": torch.get_num_threads()}


# --- broker ceiling ------------------------------------------------------------------------

def _loadgen(args: list[str], wait: bool = True) -> subprocess.Popen | dict:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.orchestration.loadgen", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise ReplayError(f"load generator {args[0]} failed ({proc.returncode}):\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def broker_ceiling(mqtt_url: str, size: int, count: int) -> dict:
    """QoS 1 messages/s from a paho publisher process to a paho subscriber process."""
    topic = f"bench/ceiling/{time.monotonic_ns()}"
    sub = _loadgen(["sub", "--mqtt-url", mqtt_url, "--topic", topic, "--count", str(count)], wait=False)
    assert sub.stdout is not None
    sub.stdout.readline()  # {"ready": true}: subscribed
    pub = _loadgen(["pub", "--mqtt-url", mqtt_url, "--topic", topic, "--count", str(count), "--size", str(size)])
    out, err = sub.communicate(timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    return {"message_bytes": size, "published_per_s": pub["messages_per_s"], "received_per_s": got["messages_per_s"],
            "received": got["messages"], "sent": count}


# --- the edge's capacity -------------------------------------------------------------------

class Site:
    """One site's Redis view, read incrementally: the decisions and named losses since last time."""

    def __init__(self, r: redis.Redis, site: str) -> None:
        self.r, self.site = r, site
        self._cursor = {names.results_stream(site): "-", names.losses_stream(site): "-"}
        self.decided: set[int] = set()
        self.shed: set[int] = set()

    def _since(self, stream: str) -> list[dict]:
        out = []
        while True:
            cur = self._cursor[stream]
            chunk = self.r.xrange(stream, min="-" if cur == "-" else f"({cur}", count=5000)
            if not chunk:
                return out
            out.extend(fields for _, fields in chunk)
            self._cursor[stream] = chunk[-1][0].decode()

    def poll(self) -> list[Decision]:
        """New decisions (and shed frames, kept in `shed`) since the last poll."""
        decs = [Decision.decode(f[b"msg"]) for f in self._since(names.results_stream(self.site))]
        self.decided.update(d.frame_id for d in decs)
        self.shed.update(int(f[b"frame"]) for f in self._since(names.losses_stream(self.site)))
        return decs

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(names.counters_key(self.site)).items()}


def _latency(decs: list[Decision]) -> dict:
    out = {}
    for exit_name in ("exit1", "exit2", "cloud", "all"):
        v = [d.latency_ms for d in decs if exit_name in ("all", d.exit)]
        out[exit_name] = ({k: round(float(x), 1) for k, x in zip(("p50", "p95", "p99"), np.percentile(v, [50, 95, 99]))}
                          if v else None)
    return out


def offer(site: Site, mqtt_url: str, templates_path: str, rate: int, start: int, seconds: float,
          settle_s: float = 5.0) -> dict:
    """Offer `rate` frames/s of pre-encoded observations for `seconds` (the generator sheds,
    naming them, while the edge reports observations arriving a second late); what the edge made
    of it: decided, shed, lost (neither), duplicates, rate and latency."""
    frames = max(1, int(rate * seconds))
    ids = range(start, start + frames)
    wanted = set(ids)
    before = site.counters()
    gen = _loadgen(["feed", "--observations", templates_path, "--site", site.site, "--mqtt-url", mqtt_url,
                    "--cameras", "0,1,2,3,4,5", "--start", str(start), "--stop", str(start + frames), "--fps", str(rate),
                    "--overload", "shed", "--shed-lag-ms", "1000", "--batch", "256"])
    decs: list[Decision] = []
    end = time.monotonic() + settle_s
    while True:
        decs.extend(d for d in site.poll() if d.frame_id in ids)
        settled = len({d.frame_id for d in decs}) + len((site.shed - site.decided) & wanted)
        if settled >= frames or time.monotonic() > end:
            break
        time.sleep(0.2)  # results are in Redis: look again
    after = site.counters()
    decided = {d.frame_id for d in decs}
    shed = len((site.shed & wanted) - decided)
    # the rate it decided at: frames over the time from the first decision to the last (when the
    # edge keeps up, decisions follow captures; when it does not, they trail on after the source stops)
    span = (max(d.decided_at for d in decs) - min(d.decided_at for d in decs)) if len(decs) > 1 else 0.0
    return {"offered_fps": rate, "frames": frames, "decided": len(decided), "duplicates": len(decs) - len(decided),
            "shed_frames": shed, "lost": frames - len(decided) - shed,
            "decided_fps": round((len(decided) - 1) / span, 1) if span > 0 else None, "generator": gen,
            "latency_ms": _latency(decs), "late": after.get("late", 0) - before.get("late", 0)}


def edge_capacity(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str, templates_path: str, t1, t2,
                  log_dir: str) -> dict:
    """Stepped rates into one edge process (with one cloud worker) until it stops holding."""
    r = redis_client(redis_url)
    site = Site(r, f"bench-edge-{time.monotonic_ns() % 10**8}")
    procs = _start_edge_cloud(cfg, site.site, mqtt_url, redis_url, t1, t2, log_dir)
    steps, start, capacity = [], 0, 0
    try:
        for rate in cfg.edge_rates:
            step = offer(site, mqtt_url, templates_path, rate, start, cfg.step_s)
            start += step["frames"]
            step["held"] = (step["decided"] == step["frames"] and (step["decided_fps"] or 0) >= 0.95 * rate)
            steps.append(step)
            log.info("edge at %d fps offered: decided %s fps, shed %d, lost %d, held %s", rate, step["decided_fps"],
                     step["shed_frames"], step["lost"], step["held"])
            if not step["held"]:
                break
            capacity = rate
        overload = offer(site, mqtt_url, templates_path, 2 * max(capacity, cfg.edge_rates[0]), start, cfg.step_s,
                         settle_s=10.0)
        start += overload["frames"]
    finally:
        exits = stop_all(procs)
        r.close()
    return {"steps": steps, "capacity_fps": capacity, "overload": overload, "exit_status": exits}


def _start_edge_cloud(cfg: StreamBenchConfig, site: str, mqtt_url: str, redis_url: str, t1, t2, log_dir: str,
                      aggregators: int = 1, profile: str | None = None) -> list[RoleProcess]:
    common = ["--site", site, "--mqtt-url", mqtt_url, "--redis-url", redis_url, "--checkpoint", cfg.checkpoint,
              "--threads", "1"]
    cloud = [start_role("cloud", [*common, "--device", "cpu"], log_dir, f"{site}-cloud")]
    t_args = ["--t2", repr(t2)] + ([] if t1 is None else ["--t1", repr(t1)])
    env = {"ADA_DDNN_PROFILE": profile} if profile else {}  # the loop under cProfile, written when it stops
    edges = [start_role("edge", [*common, *t_args], log_dir, f"{site}-edge-{i}", env) for i in range(aggregators)]
    r = redis_client(redis_url)
    try:
        wait_alive(r, site, "cloud", cloud)
        wait_alive(r, site, "edge", edges)
    finally:
        r.close()
    return cloud + edges


def edge_profile(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str, templates_path: str, t1, t2, rate: int,
                 log_dir: str) -> dict:
    """A top-10 (own time) profile of the edge process while offered `rate` frames/s."""
    r = redis_client(redis_url)
    site = Site(r, f"bench-prof-{time.monotonic_ns() % 10**8}")
    prof = os.path.join(log_dir, "edge.prof")
    procs = _start_edge_cloud(cfg, site.site, mqtt_url, redis_url, t1, t2, log_dir, profile=prof)
    try:
        step = offer(site, mqtt_url, templates_path, rate, 0, cfg.step_s)
    finally:
        stop_all(procs)
        r.close()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:10]  # type: ignore[attr-defined]
    top = [{"function": f"{os.path.basename(fn)}:{line}({name})", "own_s": round(v[2], 3),
            "share": round(v[2] / total, 3), "calls": v[1]} for (fn, line, name), v in rows]
    return {"offered_fps": rate, "decided_fps": step["decided_fps"], "top10_own_time": top}


def soak(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str, templates_path: str, t1, t2, log_dir: str,
         fps: int) -> dict:
    """RSS of the edge and cloud processes at the start and end of a long run at `fps`."""
    r = redis_client(redis_url)
    site = Site(r, f"bench-soak-{time.monotonic_ns() % 10**8}")
    procs = _start_edge_cloud(cfg, site.site, mqtt_url, redis_url, t1, t2, log_dir)
    try:
        warm = offer(site, mqtt_url, templates_path, fps, 0, 5.0)
        start_rss = {p.name: _rss_mib(p.proc.pid) for p in procs}
        run = offer(site, mqtt_url, templates_path, fps, warm["frames"], cfg.soak_frames / fps,
                    settle_s=20.0)
        end_rss = {p.name: _rss_mib(p.proc.pid) for p in procs}
    finally:
        stop_all(procs)
        r.close()
    return {"fps": fps, "frames": run["frames"], "decided": run["decided"], "lost": run["lost"], "shed_frames": run["shed_frames"],
            "duplicates": run["duplicates"], "rss_mib_start": start_rss, "rss_mib_end": end_rss}


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- end to end and scaling (replays with role processes) -----------------------------------

def _replay(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str, **kw: Any) -> dict:
    rc = ReplayConfig(checkpoint=cfg.checkpoint, data=cfg.data, mqtt_url=mqtt_url, redis_url=redis_url,
                      compare=False, progress=False, cloud_device="cpu", processes=True, **kw)
    rep = run_replay(rc)
    return {k: rep[k] for k in ("frames", "results", "lost", "duplicates", "incomplete", "throughput_fps",
                                "latency_ms", "accounting", "aggregators", "workers", "fps")}


def end_to_end(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str) -> dict:
    steps, best = [], 0
    for fps in cfg.replay_fps:
        rep = _replay(cfg, mqtt_url, redis_url, fps=float(fps), n=int(fps * cfg.step_s))
        rep["sustained"] = bool(rep["lost"] == 0 and (rep["throughput_fps"] or 0) >= 0.95 * fps)
        steps.append(rep)
        log.info("replay at %d fps: %s fps, lost %d, sustained %s", fps, rep["throughput_fps"], rep["lost"],
                 rep["sustained"])
        if not rep["sustained"]:
            break
        best = fps
    at = {}
    for share in (0.5, 0.9):
        fps = max(1, int(best * share))
        at[f"{int(share * 100)}%"] = _replay(cfg, mqtt_url, redis_url, fps=float(fps), n=int(fps * cfg.step_s * 2))
    full = _replay(cfg, mqtt_url, redis_url, fps=0.0, n=int(cfg.scaling_frames))
    return {"steps": steps, "sustainable_fps": best, "latency_at": at, "full_speed": full}


def scaling(cfg: StreamBenchConfig, mqtt_url: str, redis_url: str) -> list[dict]:
    return [_replay(cfg, mqtt_url, redis_url, fps=0.0, n=cfg.scaling_frames, aggregators=a, workers=w)
            for a in cfg.aggregators for w in cfg.workers]


# --- the whole run --------------------------------------------------------------------------

def bench_stream(cfg: StreamBenchConfig) -> dict:
    t0 = time.time()
    set_threads(2)
    model = load_checkpoint(cfg.checkpoint)
    t1, t2 = thresholds(cfg.checkpoint, model.cfg)
    data = load_cifar10(cfg.data)
    scenes = to_float(data.test.images[:cfg.templates])
    log.info("compute ceiling ...")
    compute = compute_ceiling(model, scenes, t1, t2)
    set_threads(1)
    log_dir = tempfile.mkdtemp(prefix="ada-bench-")
    try:
        out = _measure(cfg, model, t1, t2, data, scenes, compute, log_dir)
    except BaseException:
        log.error("bench stream: the roles' logs are kept in %s", log_dir)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _measure(cfg: StreamBenchConfig, model: AdaDDNN, t1: float | None, t2: float, data, scenes: torch.Tensor,
             compute: dict, log_dir: str) -> dict:
    templates_path = os.path.join(log_dir, "observations.msgpack")
    observations = _observations(model, scenes, data.test.labels[:cfg.templates])
    write_templates(templates_path, observations)
    size = int(np.mean([len(o.encode()) for o in observations[0]]))  # the broker ceiling's message size
    with embedded_services(None, None) as (mqtt_url, redis_url):
        log.info("broker ceiling ...")
        broker = broker_ceiling(mqtt_url, size, cfg.broker_messages)
        log.info("edge capacity ...")
        edge = edge_capacity(cfg, mqtt_url, redis_url, templates_path, t1, t2, log_dir)
        edge["observations_per_s"] = edge["capacity_fps"] * model.cfg.num_cameras
        edge["fraction_of_broker_ceiling"] = round(edge["observations_per_s"] / broker["received_per_s"], 3)
        log.info("edge profile ...")
        profile = edge_profile(cfg, mqtt_url, redis_url, templates_path, t1, t2, max(edge["capacity_fps"], 100),
                               log_dir)
        log.info("end to end ...")
        e2e = end_to_end(cfg, mqtt_url, redis_url)
        log.info("scaling ...")
        scale = scaling(cfg, mqtt_url, redis_url)
        soak_fps = cfg.soak_fps or max(50, int(0.8 * edge["capacity_fps"]))
        memory = (soak(cfg, mqtt_url, redis_url, templates_path, t1, t2, log_dir, soak_fps)
                  if cfg.soak_frames else None)
    return {"config": {**cfg.__dict__, "thresholds": {"t1": t1, "t2": t2}},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "compute": compute, "broker": broker, "edge": edge, "edge_profile": profile, "end_to_end": e2e,
            "scaling": scale, "memory": memory, "targets": targets(compute, broker, edge, e2e)}


@torch.no_grad()
def _observations(model: AdaDDNN, scenes: torch.Tensor, labels: np.ndarray) -> list[list[CameraObservation]]:
    feats, logits = model.run_cameras(prepare_views(model.cfg, scenes))
    frames = []
    for i in range(scenes.shape[0]):
        frame = []
        for k in range(model.cfg.num_cameras):
            pred = None if logits is None else int(logits[i, k].argmax())
            ent = None if logits is None else float(normalized_entropy(logits[i, k]))
            frame.append(CameraObservation("bench", i, k, 1.0, pred, ent, FeatureTensor.quantize(feats[i, k]),
                                           int(labels[i])))
        frames.append(frame)
    return frames


def targets(compute: dict, broker: dict, edge: dict, e2e: dict) -> dict:
    """The issue's targets, as measured ratios of this run."""
    overload = edge["overload"]
    cap = max(1, edge["capacity_fps"])
    return {
        "edge_fraction_of_broker_ceiling": {"target": 0.5, "measured": edge["fraction_of_broker_ceiling"]},
        "overload_decided_share_of_capacity": {"target": 0.9,
                                               "measured": round((overload["decided_fps"] or 0) / cap, 3),
                                               "named_or_decided": overload["lost"] == 0},
        "end_to_end_fps": {"target": 3 * 212, "measured": e2e["sustainable_fps"],
                           "full_speed": e2e["full_speed"]["throughput_fps"]},
        "end_to_end_share_of_compute_ceiling": {
            "target": 0.35, "measured": round(max(e2e["sustainable_fps"], e2e["full_speed"]["throughput_fps"] or 0)
                                              / compute["adaptive_batched_fps"], 3)},
    }


__all__ = ["StreamBenchConfig", "bench_stream"]
