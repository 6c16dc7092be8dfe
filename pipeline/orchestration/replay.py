"""`ada-ddnn replay`, the main job: cameras + edge + cloud streaming CIFAR-10 frames end to end.

    ada-ddnn replay --checkpoint models/ada.safetensors --n 1000
    ada-ddnn replay --checkpoint models/ada.safetensors --mqtt-url mqtt://host:1883 --redis-url redis://host:6379/0 \\
        --aggregators 2 --workers 2 --wire-dtype float32 --json reports/replay.json

Runs the six cameras, --aggregators edge aggregators and --workers cloud workers (each a process
of its own, `ada-ddnn cameras|edge|cloud`; with --no-processes, threads of this process, each with
its own broker connections) against --mqtt-url and --redis-url (env ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL). With neither,
it starts a private Mosquitto and Redis and stops them at the end. Results are read back from
the results stream (and counted on the MQTT results topic); a live bar shows frames done, the
exit mix and the running accuracy. At the end: a summary table and a JSON report with the
evaluation report's keys that apply to a stream, the stream's own counts (frames, results,
lost, duplicates, late), throughput and capture-to-decision latency per exit path, and the
comparison with offline evaluation of the same frames (`offline`: same codec, decisions must
be equal; `offline_float32`: features not quantised, agreement and accuracy difference).

    ada-ddnn replay --n 0 --upload lazy --wire-dtype int1      # summaries first, 1-bit features on request

--upload (lazy for an ADA-DDNN checkpoint, eager for DDNN) is the cameras' upload; the report then
gives the bytes per camera per frame on the camera links, all messages counted (`link`), by exit
path, and the edge block's runs per 100 frames.

    ada-ddnn replay --sites 4 --n 500 --redis-url redis+cluster://127.0.0.1:7000,127.0.0.1:7001

With --sites N, N sites run side by side against the one Redis (or Redis Cluster): each its
own cameras and --aggregators edge aggregators, and (unless --mqtt-url names a shared broker)
its own embedded Mosquitto; --workers cloud workers serve all of them (`ada-ddnn cloud --sites`).
Site i replays frames start + i*n .. start + (i+1)*n (--n 0: the split divided evenly). The
report has the totals and, under `sites`, each site's report with its accounting and its exit
mix beside offline evaluation's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
import torch

from cloud.worker import CloudConfig, Worker
from devices.camera import UPLOADS, CameraConfig, CameraFeed, resolve_upload
from edge.aggregator import Aggregator, EdgeConfig
from pipeline.checkpoint import thresholds
from pipeline.compute import resolve_device, set_threads
from pipeline.config import MODEL_WIRE_DTYPE, default_data_dir, resolve_wire_dtype
from pipeline.data import SPLITS, Cifar10
from pipeline.entropy import check_thresholds
from pipeline.errors import ConnectError, ReplayError
from pipeline.fileio import check_writable, write_json
from pipeline.offline.network import AdaDDNN
from pipeline.orchestration.replay_report import (
    ResultCollector,
    accuracy,
    compare,
    report,
    sites_table,
    summary_table,
)
from pipeline.orchestration.roles import RoleProcess, start_role, stop_all, wait_alive
from pipeline.orchestration.status import RETAINED_QUIET_S
from pipeline.settings import add_command, check_fields, config_from_args, printed
from pipeline.transport.embedded import embedded_services
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.transport.redis_client import redis_client
from pipeline.wire import names
from pipeline.wire.control import check_fps
from pipeline.wire.messages import DTYPES, EXIT_NAMES

log = logging.getLogger(__name__)

# In-process cameras share one interpreter with every edge and worker of the replay, so an edge
# can fall seconds behind on a busy machine: they linger until the replay has every result
# (`release_cameras`), up to this long without a feature request (the cameras' --linger-ms default,
# 2 s, once let a loaded test suite's edge find the cameras gone and decide 30 frames without
# features).
THREAD_LINGER_MS = 10_000


@dataclass(frozen=True)
class ReplayConfig:
    """One replay: which frames, which network, how many of each role, which brokers."""

    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors); its model card gives the thresholds
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    split: str = field(default="test", metadata={"choices": SPLITS})  # which CIFAR-10 split the cameras replay
    start: int = field(default=0, metadata={"min": 0})  # first frame of the split
    n: int = field(default=1000, metadata={"min": 0})  # frames to replay; 0 = to the end of the split
    fps: float = field(default=0.0, metadata={"min": 0})  # frames per second; 0 = as fast as possible
    wire_dtype: str = field(default=MODEL_WIRE_DTYPE, metadata={"choices": (MODEL_WIRE_DTYPE, *DTYPES)})  # code of the features on the wire; model = the one the checkpoint was trained for (int8 if none)
    upload: str = field(default="auto", metadata={"choices": UPLOADS})  # the cameras' upload: lazy (summaries, features when the edge asks), eager (features always), auto (lazy for ADA-DDNN, eager for DDNN)
    request_deadline_ms: int = field(default=1000, metadata={"min": 1, "max": 86400000})  # lazy upload: the edge decides a frame this long (ms) after asking for its features, with those that came
    early_exit1: bool = True  # lazy upload: the edge claims a frame at its first summary under T1 (off: waits for all summaries or the deadline)
    t1: float | None = None  # exit 1 threshold; none = the model card's
    t2: float | None = None  # exit 2 threshold; none = the model card's
    deadline_ms: int = field(default=50, metadata={"min": 1, "max": 86400000})  # edge deadline (ms) after a frame's first observation
    aggregators: int = field(default=1, metadata={"min": 1})  # edge aggregators
    workers: int = field(default=1, metadata={"min": 1})  # cloud workers
    mqtt_url: str | None = None  # Mosquitto, mqtt://host:port; none = start an embedded one
    redis_url: str | None = None  # Redis, redis://host:port/db, or a Redis Cluster, redis+cluster://host:port,host:port; none = start an embedded one
    site: str = ""  # site id; "" = a fresh replay-xxxxxxxx
    window: int = field(default=128, metadata={"min": 1})  # frames in flight at most (cameras wait for results beyond it)
    camera_batch: int = field(default=64, metadata={"min": 1, "max": 10_000})  # frames per camera forward pass
    cloud_batch: int = field(default=64, metadata={"min": 1, "max": 10_000})  # escalations per cloud forward pass at most
    cloud_wait_ms: int = field(default=10, metadata={"min": 0, "max": 60_000})  # the cloud waits at most this long (ms) to fill a batch
    cloud_device: str = "auto"  # auto (the GPU when there is one), cpu, cuda
    silent: tuple[int, ...] = field(default=(), metadata={"min": 0})  # cameras that never publish (a dead camera), comma-separated
    compare: bool = True  # also run offline evaluation of the same frames and compare
    progress: bool = True  # show a live progress bar
    drain_timeout_s: float = field(default=60.0, metadata={"min": 0, "max": 31536000})  # after the cameras finish, wait this long (s) for the last results
    keep_keys: bool = False  # leave the site's Redis keys for inspection
    processes: bool = True  # run cameras, aggregators and workers as separate processes (as deployed); no = threads of this process
    overload_lag_ms: int = field(default=300, metadata={"min": 1})  # processes: the cameras hold back while an aggregator reports observations reaching it this late (ms)
    threads: int = field(default=1, metadata={"min": 0})  # torch CPU threads; 1 because the roles already run in parallel threads (several OpenMP pools spinning against each other ran 50x slower on 2 cores)
    sites: int = field(default=1, metadata={"min": 1})  # sites side by side, each with its own cameras, aggregators and (embedded) Mosquitto; the cloud workers serve them all
    metrics_port: int = field(default=0, metadata={"min": 0, "max": 65535})  # first of consecutive ports the roles serve Prometheus /metrics on (cloud workers, then aggregators, then cameras); 0 = off

    def __post_init__(self) -> None:
        check_fields(self)  # choices and ranges, as declared on the fields
        if self.site:
            names.check_site(self.site)
        check_thresholds(self.t1, self.t2)
        check_fps(self.fps)
        if len(set(self.silent)) != len(self.silent):
            raise ValueError(f"silent: camera ids, 0 or more, each once, got {list(self.silent)}")


def run_replay(cfg: ReplayConfig, data: Cifar10 | None = None, model: AdaDDNN | None = None) -> dict:
    """Run the whole pipeline over the frames `cfg` names and return the JSON report."""
    threads_before = set_threads(cfg.threads)
    try:
        return _run_replay(cfg, data, model)
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class SiteRun:
    """One site of a replay: its id, frames, broker, result collector and, at the end, its report."""

    site: str
    frame_ids: range
    mqtt_url: str = ""
    collector: ResultCollector | None = None
    report: dict = field(default_factory=dict)


def site_ranges(cfg: ReplayConfig, split_len: int) -> list[range]:
    """Each site's frames: consecutive slices of n frames (n = 0: the rest of the split divided evenly)."""
    per = (split_len - cfg.start) // cfg.sites if cfg.n == 0 else cfg.n
    stop_at = cfg.start + per * cfg.sites
    if per < 1 or stop_at > split_len:
        raise ReplayError(f"frames {cfg.start}..{stop_at} ({cfg.sites} sites of {per}) are not in the {cfg.split} "
                          f"split of {split_len}")
    return [range(cfg.start + i * per, cfg.start + (i + 1) * per) for i in range(cfg.sites)]


def _run_replay(cfg: ReplayConfig, data: Cifar10 | None, model: AdaDDNN | None) -> dict:
    from pipeline.data import load_cifar10
    from pipeline.offline.network import load_checkpoint

    t_start = time.time()
    if data is not None and cfg.processes:
        raise ReplayError("role processes read the frames from --data on disk: replay in-memory data with "
                          "processes=False")
    model = model if model is not None else load_checkpoint(cfg.checkpoint)
    cfg = dataclasses.replace(cfg, wire_dtype=resolve_wire_dtype(cfg.wire_dtype, model.cfg))  # the report names the code
    data = data if data is not None else load_cifar10(cfg.data)
    split = data.split(cfg.split)
    t1, t2 = thresholds(cfg.checkpoint, model.cfg, cfg.t1, cfg.t2)
    upload = resolve_upload(cfg.upload, model.cfg.has_camera_classifiers)
    base = cfg.site or f"replay-{uuid.uuid4().hex[:8]}"
    runs = [SiteRun(base if cfg.sites == 1 else f"{base[:60]}-{i}", ids)
            for i, ids in enumerate(site_ranges(cfg, len(split)))]
    cams = tuple(k for k in range(model.cfg.num_cameras) if k not in cfg.silent)
    if not cams or any(k >= model.cfg.num_cameras for k in cfg.silent):
        raise ReplayError(f"silent cameras {list(cfg.silent)}: the network has cameras 0..{model.cfg.num_cameras - 1}, "
                          "and at least one must publish")
    embedded = {"mqtt": cfg.mqtt_url is None, "redis": cfg.redis_url is None}
    total = sum(len(run.frame_ids) for run in runs)

    with contextlib.ExitStack() as services:
        mqtt_url, redis_url = services.enter_context(embedded_services(cfg.mqtt_url, cfg.redis_url))
        for i, run in enumerate(runs):  # a Mosquitto per site, unless one was given for all
            run.mqtt_url = mqtt_url if i == 0 or cfg.mqtt_url else \
                services.enter_context(embedded_services(None, redis_url))[0]
        r = redis_client(redis_url)
        stop = threading.Event()
        for run in runs:
            _clear(r, run.site)
            run.collector = ResultCollector(r, run.mqtt_url, run.site, run.frame_ids).start()
        roles_cls = ProcessRoles if cfg.processes else ThreadRoles
        roles = roles_cls(cfg, model, runs, redis_url, cams, t1, t2, split, stop)
        bar = _bar(total, cfg.progress)
        shown = 0

        def tick() -> None:
            nonlocal shown
            decs = []
            for run in runs:
                with run.collector.cond:
                    decs.extend(run.collector.results.values())
            if bar is None or len(decs) == shown:
                return
            bar.update(len(decs) - shown)
            shown = len(decs)
            mix = {e: sum(d.exit == e for d in decs) / len(decs) for e in EXIT_NAMES}
            acc = accuracy(decs)
            bar.set_postfix_str(" ".join(f"{e} {v:.0%}" for e, v in mix.items()) +
                                (f" acc {acc:.2%}" if acc is not None else ""))

        try:
            roles.start(r, stop)
            while roles.cameras_running():
                time.sleep(0.25)  # the bar's refresh; the collector itself is event-driven
                tick()
                if all(run.collector.complete() for run in runs):
                    roles.release_cameras()  # every frame decided: no feature request is to come
            roles.check_cameras()
            deadline = time.monotonic() + cfg.drain_timeout_s + cfg.deadline_ms / 1000
            for run in runs:
                run.collector.wait_all(deadline, tick)
            tick()
        finally:
            stop.set()
            if bar is not None:
                bar.close()
            exits = roles.stop()
            for run in runs:
                if run.collector is not None:
                    run.collector.close()
        for run in runs:
            counters = {k.decode(): int(v) for k, v in r.hgetall(names.counters_key(run.site)).items()}
            shed_ids = {int(f[b"frame"]) for _, f in r.xrange(names.losses_stream(run.site))}
            waits = r.hgetall(names.feature_wait_key(run.site))
            if not cfg.keep_keys:
                _clear(r, run.site)
                if cfg.mqtt_url:  # a broker of the user's: it outlives the replay
                    _clear_retained(run.mqtt_url, run.site)
            run.report = _site_report(cfg, model, split, run, t1, t2, counters, shed_ids, t_start, waits)
            run.report["upload"] = upload
        r.close()

    if len(runs) == 1:
        out = runs[0].report
    else:
        for run in runs:
            run.report.update(_compare(cfg, model, split, run, t1, t2))
        out = {"sites": {run.site: run.report for run in runs}, "frames": total,
               **{k: sum(run.report[k] for run in runs) for k in ("results", "lost", "duplicates", "late")},
               "accounting": {k: sum(run.report["accounting"][k] for run in runs)
                              for k in ("captured", "decided", "shed", "unexplained")},
               "exit_mix_equal_to_offline": all(run.report.get("offline", {}).get("exit_rate_equal", False)
                                                for run in runs) if cfg.compare else None}
    out["services"] = {"mqtt_url": mqtt_url if len(runs) == 1 else [run.mqtt_url for run in runs],
                       "redis_url": redis_url, "embedded": embedded}
    out["roles"] = {"processes": cfg.processes, "exit_status": exits}
    if len(runs) == 1:
        out.update(_compare(cfg, model, split, runs[0], t1, t2))
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def _site_report(cfg: ReplayConfig, model: AdaDDNN, split, run: SiteRun, t1, t2, counters: dict, shed_ids: set,
                 t_start: float, feature_wait: dict) -> dict:
    collector, frame_ids = run.collector, run.frame_ids
    decs = [collector.results[f] for f in frame_ids if f in collector.results]
    out = report(cfg, model, run.site, len(frame_ids), t1, t2, decs, collector, counters, t_start, feature_wait)
    shed_whole = len(shed_ids - set(collector.results))
    out["accounting"] = {"captured": len(frame_ids), "decided": len(decs), "shed": shed_whole,
                         "unexplained": len(frame_ids) - len(decs) - shed_whole}
    return out


def _compare(cfg: ReplayConfig, model: AdaDDNN, split, run: SiteRun, t1, t2) -> dict:
    """Offline evaluation of the site's frames beside its decisions (with --sites, exit mixes too)."""
    if not cfg.compare or not any(f in run.collector.results for f in run.frame_ids):
        return {}
    return compare(cfg, model, split, run.frame_ids, run.collector.results, t1, t2, exit_mix=cfg.sites > 1)


class ThreadRoles:
    """Cameras, aggregators and workers as threads of this process (`--no-processes`), the
    cameras gated by a window of frames in flight."""

    def __init__(self, cfg: ReplayConfig, model: AdaDDNN, runs: list[SiteRun], redis_url: str,
                 cams: tuple[int, ...], t1: float | None, t2: float, split, stop: threading.Event) -> None:
        sites = [run.site for run in runs]
        self.cfg = cfg
        self.workers = [Worker(CloudConfig(site=sites[0], sites=",".join(sites), site_mqtt=_site_mqtt(runs),
                                           mqtt_url=runs[0].mqtt_url, redis_url=redis_url, checkpoint=cfg.checkpoint,
                                           batch=cfg.cloud_batch, wait_ms=cfg.cloud_wait_ms, device=cfg.cloud_device,
                                           service_id=f"cloud-{i}-{uuid.uuid4().hex[:6]}"),
                               copy.deepcopy(model.cloud)) for i in range(cfg.workers)]
        self.aggs = [Aggregator(EdgeConfig(site=run.site, mqtt_url=run.mqtt_url, redis_url=redis_url,
                                           checkpoint=cfg.checkpoint, deadline_ms=cfg.deadline_ms,
                                           request_deadline_ms=cfg.request_deadline_ms, early_exit1=cfg.early_exit1,
                                           service_id=f"edge-{i}-{uuid.uuid4().hex[:6]}"),
                                copy.deepcopy(model.edge), t1, t2) for run in runs for i in range(cfg.aggregators)]
        self.feeds = [CameraFeed(CameraConfig(site=run.site, mqtt_url=run.mqtt_url, checkpoint=cfg.checkpoint,
                                              data=cfg.data, split=cfg.split, start=run.frame_ids.start,
                                              stop=run.frame_ids.stop, fps=cfg.fps, wire_dtype=cfg.wire_dtype,
                                              batch=cfg.camera_batch, cameras=cams, overload="wait",
                                              upload=cfg.upload, linger_ms=THREAD_LINGER_MS),
                                 {k: copy.deepcopy(model.cameras[k]) for k in cams}, split,
                                 gate=lambda done, c=run.collector: c.gate(done, cfg.window, stop))
                      for run in runs]
        self.error: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(self, r: redis.Redis, stop: threading.Event) -> None:
        ports = metrics_ports(self.cfg.metrics_port, len(self.workers), len(self.aggs), len(self.feeds))
        for role, group in (("cloud", self.workers), ("edge", self.aggs), ("cameras", self.feeds)):
            for obj, port in zip(group, ports[role]):
                obj.metrics.serve(port)
        for w in self.workers:
            w.start()
        for a in self.aggs:
            a.start()

        def cameras(feed: CameraFeed) -> None:
            try:
                feed.connect()
                feed.run(stop)
                feed.close()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error.append(err)

        for i, feed in enumerate(self.feeds):
            self.threads.append(threading.Thread(target=cameras, args=(feed,), name=f"cameras-{i}", daemon=True))
            self.threads[-1].start()

    def cameras_running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def release_cameras(self) -> None:
        for feed in self.feeds:
            feed.release.set()

    def check_cameras(self) -> None:
        if self.error:
            raise ReplayError(f"the cameras failed: {self.error[0]}") from self.error[0]

    def stop(self) -> dict[str, int]:
        for a in self.aggs:
            a.stop()
        for w in self.workers:
            w.stop()
        for role in (*self.aggs, *self.workers, *self.feeds):
            role.metrics.close()
        return {}


def metrics_ports(first: int, workers: int, aggregators: int, cameras: int) -> dict[str, list[int]]:
    """The /metrics port of every role process from `first` on (none where first is 0), logged."""
    if not first:
        return {"cloud": [], "edge": [], "cameras": []}
    last = first + workers + aggregators + cameras - 1
    if last > 65535:
        raise ValueError(f"metrics_port {first}: the {workers + aggregators + cameras} role processes need ports "
                         f"{first}..{last}, beyond 65535")
    ports = {"cloud": list(range(first, first + workers)),
             "edge": list(range(first + workers, first + workers + aggregators)),
             "cameras": list(range(first + workers + aggregators, first + workers + aggregators + cameras))}
    log.info("metrics: cloud workers on %s, aggregators on %s, cameras on %s (http://127.0.0.1:PORT/metrics)",
             ports["cloud"], ports["edge"], ports["cameras"])
    return ports


class ProcessRoles:
    """Cameras, aggregators and workers as separate `ada-ddnn` processes, as deployed (the
    default): no role shares another's interpreter lock. The cameras run at full speed (or
    --fps) and hold back while an aggregator reports observations reaching it --overload-lag-ms
    late (lossless flow control), in place of the in-process window."""

    def __init__(self, cfg: ReplayConfig, model: AdaDDNN, runs: list[SiteRun], redis_url: str,
                 cams: tuple[int, ...], t1: float | None, t2: float, split, stop: threading.Event) -> None:
        self.cfg, self.runs, self.cams, self.t1, self.t2 = cfg, runs, cams, t1, t2
        self.redis_url = redis_url
        self.log_dir = tempfile.mkdtemp(prefix=f"ada-ddnn-{runs[0].site}-")
        self.procs: list[RoleProcess] = []
        self.cameras: list[RoleProcess] = []

    def start(self, r: redis.Redis, stop: threading.Event) -> None:
        cfg, tag, runs = self.cfg, uuid.uuid4().hex[:6], self.runs
        one = len(runs) == 1

        def common(run: SiteRun) -> list[str]:
            return ["--site", run.site, "--mqtt-url", run.mqtt_url, "--threads", "1", "--redis-url", self.redis_url,
                    "--checkpoint", cfg.checkpoint]

        thresholds_args = ["--t2", repr(self.t2)] + ([] if self.t1 is None else ["--t1", repr(self.t1)])
        ports = metrics_ports(cfg.metrics_port, cfg.workers, cfg.aggregators * len(runs), len(runs))
        port_of = {role: iter(["--metrics-port", str(p)] for p in ps) for role, ps in ports.items()}
        workers = [start_role("cloud", [*common(runs[0]), *next(port_of["cloud"], []),
                                        "--sites", ",".join(run.site for run in runs),
                                        "--site-mqtt", _site_mqtt(runs), "--batch", str(cfg.cloud_batch),
                                        "--wait-ms", str(cfg.cloud_wait_ms), "--device", cfg.cloud_device,
                                        "--service-id", f"cloud-{i}-{tag}"], self.log_dir, f"cloud-{i}")
                   for i in range(cfg.workers)]
        aggs = {run.site: [start_role("edge", [*common(run), *next(port_of["edge"], []), *thresholds_args,
                                               "--deadline-ms", str(cfg.deadline_ms),
                                               "--request-deadline-ms", str(cfg.request_deadline_ms),
                                               "--early-exit1" if cfg.early_exit1 else "--no-early-exit1",
                                               "--service-id", f"edge-{i}-{tag}"], self.log_dir,
                                      f"edge-{i}" if one else f"{run.site}-edge-{i}")
                           for i in range(cfg.aggregators)] for run in runs}
        self.procs = workers + [p for ps in aggs.values() for p in ps]
        for run in runs:
            wait_alive(r, run.site, "cloud", workers)
            wait_alive(r, run.site, "edge", aggs[run.site])
        for run in runs:
            self.cameras.append(start_role("cameras", [
                *next(port_of["cameras"], []), "--site", run.site, "--mqtt-url", run.mqtt_url, "--threads", "1", "--checkpoint", cfg.checkpoint,
                "--data", cfg.data, "--split", cfg.split, "--start", str(run.frame_ids.start),
                "--stop", str(run.frame_ids.stop), "--fps", str(cfg.fps), "--wire-dtype", cfg.wire_dtype,
                "--batch", str(cfg.camera_batch), "--cameras", ",".join(map(str, self.cams)), "--overload", "wait",
                "--upload", cfg.upload,
                "--shed-lag-ms", str(cfg.overload_lag_ms)], self.log_dir, "cameras" if one else f"{run.site}-cameras"))
        self.procs.extend(self.cameras)

    def release_cameras(self) -> None:
        """Camera processes end their linger on their own (--linger-ms of quiet)."""

    def cameras_running(self) -> bool:
        for p in self.procs:
            if p not in self.cameras and not p.alive():
                raise ReplayError(f"{p.name} died (status {p.proc.returncode}):\n{p.tail()}")
        return any(c.alive() for c in self.cameras)

    def check_cameras(self) -> None:
        for cams in self.cameras:
            if cams.proc.returncode:
                raise ReplayError(f"{cams.name} exited with status {cams.proc.returncode}:\n{cams.tail()}")

    def stop(self) -> dict[str, int]:
        exits = stop_all(self.procs)
        bad = {name: code for name, code in exits.items() if code != 0}
        if bad:
            log.error("roles that did not exit cleanly: %s; their logs are in %s", bad, self.log_dir)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return exits


def _site_mqtt(runs: list[SiteRun]) -> str:
    """`--site-mqtt` for the cloud workers: each site whose broker is not the first site's."""
    return ",".join(f"{run.site}={run.mqtt_url}" for run in runs if run.mqtt_url != runs[0].mqtt_url)


def _clear(r: redis.Redis, site: str) -> None:
    """The site's Redis keys, and its entry in the registry of sites (which `cloud --sites '*'` serves)."""
    keys = list(r.scan_iter(match=names.site_pattern(site), count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.srem(names.sites_key(), site)


def _clear_retained(mqtt_url: str, site: str, timeout_s: float = 5.0) -> int:
    """Empty the site's retained MQTT messages (camera statuses, the clock, flow statuses) on a
    broker the replay does not own, so nothing of a finished replay looks alive; returns how many.
    Retained messages come in a burst right after the subscription: taken as over once none came
    for RETAINED_QUIET_S (as `ada-ddnn status` does)."""
    topics, arrived = set(), threading.Event()

    def on_message(msg) -> None:
        if msg.retain and msg.payload:
            topics.add(msg.topic)
        arrived.set()

    try:
        client = mqtt_client(mqtt_url, f"{site}-clear-{uuid.uuid4().hex[:8]}", timeout_s=timeout_s,
                             on_connect=lambda c: c.subscribe(names.site_filter(site), qos=1), on_message=on_message)
    except ConnectError as err:
        log.warning("site %r: retained messages left on the broker: %s", site, err)
        return 0
    try:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and arrived.wait(RETAINED_QUIET_S):
            arrived.clear()
        for topic in sorted(topics):
            client.publish(topic, b"", qos=1, retain=True)
        client.wait_confirmed(timeout_s)
    finally:
        close_mqtt(client)
    return len(topics)


def _bar(n: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="frame", desc="replay", dynamic_ncols=True)


# --- CLI ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ReplayConfig, args)
    if printed(cfg, args):
        return 0
    if args.json_out:
        check_writable(args.json_out)
    resolve_device(cfg.cloud_device)  # now, not in the cloud worker's process once the brokers are up
    out = run_replay(cfg)
    print(summary_table(out) if "sites" not in out else sites_table(out))
    if args.json_out:
        write_json(args.json_out, out)
    print(json.dumps(out, indent=2))
    return 0 if out["lost"] == 0 and out["duplicates"] == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `replay` to the `ada-ddnn` parser."""
    p = add_command(subparsers, "replay", ReplayConfig, main, help="the main job: cameras + edge + cloud over MQTT and "
                    "Redis, with a report", description=__doc__)
    p.add_argument("--json", dest="json_out", help="also write the JSON report here")
