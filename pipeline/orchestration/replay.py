"""`ada-ddnn replay`, the main job: cameras + edge + cloud streaming CIFAR-10 frames end to end.

    ada-ddnn replay --checkpoint models/ada.safetensors --n 1000
    ada-ddnn replay --checkpoint models/ada.safetensors --mqtt-url mqtt://host:1883 --redis-url redis://host:6379/0 \\
        --aggregators 2 --workers 2 --wire-dtype float32 --json reports/replay.json

Runs the six cameras, --aggregators edge aggregators and --workers cloud workers (threads of
this process, each with its own broker connections, exactly as the separate processes would)
against --mqtt-url and --redis-url (env ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL). With neither,
it starts a private Mosquitto and Redis and stops them at the end. Results are read back from
the results stream (and counted on the MQTT results topic); a live bar shows frames done, the
exit mix and the running accuracy. At the end: a summary table and a JSON report with the
evaluation report's keys that apply to a stream, the stream's own counts (frames, results,
lost, duplicates, late), throughput and capture-to-decision latency per exit path, and the
comparison with offline evaluation of the same frames (`offline`: same codec, decisions must
be equal; `offline_float32`: features not quantised, agreement and accuracy difference).
"""

from __future__ import annotations

import argparse
import copy
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
from devices.camera import CameraConfig, CameraFeed
from edge.aggregator import Aggregator, EdgeConfig
from pipeline.checkpoint import thresholds
from pipeline.compute import set_threads
from pipeline.config import default_data_dir
from pipeline.data import SPLITS, Cifar10
from pipeline.errors import ReplayError
from pipeline.fileio import write_json
from pipeline.offline.network import AdaDDNN
from pipeline.orchestration.replay_report import ResultCollector, accuracy, compare, report, summary_table
from pipeline.orchestration.roles import RoleProcess, start_role, stop_all, wait_alive
from pipeline.settings import add_command, config_from_args, printed
from pipeline.transport.embedded import embedded_services
from pipeline.transport.redis_client import redis_client
from pipeline.wire import names
from pipeline.wire.messages import DTYPES, EXIT_NAMES

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ReplayConfig:
    """One replay: which frames, which network, how many of each role, which brokers."""

    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors); its model card gives the thresholds
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    split: str = field(default="test", metadata={"choices": SPLITS})  # which CIFAR-10 split the cameras replay
    start: int = 0  # first frame of the split
    n: int = 1000  # frames to replay; 0 = to the end of the split
    fps: float = 0.0  # frames per second; 0 = as fast as possible
    wire_dtype: str = field(default="int8", metadata={"choices": tuple(DTYPES)})  # dtype of the features on the wire
    t1: float | None = None  # exit 1 threshold; none = the model card's
    t2: float | None = None  # exit 2 threshold; none = the model card's
    deadline_ms: int = 50  # edge deadline (ms) after a frame's first observation
    aggregators: int = 1  # edge aggregators
    workers: int = 1  # cloud workers
    mqtt_url: str | None = None  # Mosquitto, mqtt://host:port; none = start an embedded one
    redis_url: str | None = None  # Redis, redis://host:port/db, or a Redis Cluster, redis+cluster://host:port,host:port; none = start an embedded one
    site: str = ""  # site id; "" = a fresh replay-xxxxxxxx
    window: int = 128  # frames in flight at most (cameras wait for results beyond it)
    camera_batch: int = 64  # frames per camera forward pass
    cloud_batch: int = 64  # escalations per cloud forward pass at most
    cloud_wait_ms: int = 10  # the cloud waits at most this long (ms) to fill a batch
    cloud_device: str = "auto"  # auto (the GPU when there is one), cpu, cuda
    silent: tuple[int, ...] = ()  # cameras that never publish (a dead camera), comma-separated
    compare: bool = True  # also run offline evaluation of the same frames and compare
    progress: bool = True  # show a live progress bar
    drain_timeout_s: float = 60.0  # after the cameras finish, wait this long (s) for the last results
    keep_keys: bool = False  # leave the site's Redis keys for inspection
    processes: bool = True  # run cameras, aggregators and workers as separate processes (as deployed); no = threads of this process
    overload_lag_ms: int = 300  # processes: the cameras hold back while an aggregator reports observations reaching it this late (ms)
    threads: int = 1  # torch CPU threads; 1 because the roles already run in parallel threads (several OpenMP pools spinning against each other ran 50x slower on 2 cores)

    def __post_init__(self) -> None:
        if self.wire_dtype not in DTYPES:
            raise ValueError(f"wire_dtype must be one of {tuple(DTYPES)}")
        if self.aggregators < 1 or self.workers < 1 or self.window < 1 or self.n < 0:
            raise ValueError("need at least one aggregator, one worker, window >= 1 and n >= 0")
        if self.overload_lag_ms < 1:
            raise ValueError("overload_lag_ms must be positive")
        if self.fps < 0 or self.start < 0 or self.camera_batch < 1 or self.cloud_batch < 1 or self.deadline_ms < 1:
            raise ValueError("need fps >= 0, start >= 0, camera_batch and cloud_batch >= 1, deadline_ms >= 1")
        if self.site:
            names.check_site(self.site)


def run_replay(cfg: ReplayConfig, data: Cifar10 | None = None, model: AdaDDNN | None = None) -> dict:
    """Run the whole pipeline over the frames `cfg` names and return the JSON report."""
    threads_before = set_threads(cfg.threads)
    try:
        return _run_replay(cfg, data, model)
    finally:
        torch.set_num_threads(threads_before)


def _run_replay(cfg: ReplayConfig, data: Cifar10 | None, model: AdaDDNN | None) -> dict:
    from pipeline.data import load_cifar10
    from pipeline.offline.network import load_checkpoint

    t_start = time.time()
    if data is not None and cfg.processes:
        raise ReplayError("role processes read the frames from --data on disk: replay in-memory data with "
                          "processes=False")
    model = model if model is not None else load_checkpoint(cfg.checkpoint)
    data = data if data is not None else load_cifar10(cfg.data)
    split = data.split(cfg.split)
    stop_at = len(split) if cfg.n == 0 else cfg.start + cfg.n
    if stop_at > len(split) or cfg.start >= stop_at:
        raise ReplayError(f"frames {cfg.start}..{stop_at} are not in the {cfg.split} split of {len(split)}")
    frame_ids = range(cfg.start, stop_at)
    n = len(frame_ids)
    t1, t2 = thresholds(cfg.checkpoint, model.cfg, cfg.t1, cfg.t2)
    site = cfg.site or f"replay-{uuid.uuid4().hex[:8]}"
    cams = tuple(k for k in range(model.cfg.num_cameras) if k not in cfg.silent)
    mqtt_url, redis_url = cfg.mqtt_url, cfg.redis_url
    embedded = {"mqtt": mqtt_url is None, "redis": redis_url is None}

    with embedded_services(mqtt_url, redis_url) as (mqtt_url, redis_url):
        r = redis_client(redis_url)
        _clear(r, site)
        collector = ResultCollector(r, mqtt_url, site, frame_ids).start()
        stop = threading.Event()
        roles_cls = ProcessRoles if cfg.processes else ThreadRoles
        roles = roles_cls(cfg, model, site, mqtt_url, redis_url, cams, stop_at, t1, t2, split,
                          lambda done: collector.gate(done, cfg.window, stop))
        bar = _bar(n, cfg.progress)
        shown = 0

        def tick() -> None:
            nonlocal shown
            with collector.cond:
                decs = list(collector.results.values())
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
            roles.check_cameras()
            collector.wait_all(time.monotonic() + cfg.drain_timeout_s + cfg.deadline_ms / 1000, tick)
            tick()
        finally:
            stop.set()
            if bar is not None:
                bar.close()
            exits = roles.stop()
            collector.close()
        counters = {k.decode(): int(v) for k, v in r.hgetall(names.counters_key(site)).items()}
        shed_ids = {int(f[b"frame"]) for _, f in r.xrange(names.losses_stream(site))}
        if not cfg.keep_keys:
            _clear(r, site)
        r.close()

    decs = [collector.results[f] for f in frame_ids if f in collector.results]
    out = report(cfg, model, site, n, t1, t2, decs, collector, counters, t_start)
    shed_whole = len(shed_ids - set(collector.results))
    out["accounting"] = {"captured": n, "decided": len(decs), "shed": shed_whole,
                         "unexplained": n - len(decs) - shed_whole}
    out["services"] = {"mqtt_url": mqtt_url, "redis_url": redis_url, "embedded": embedded}
    out["roles"] = {"processes": cfg.processes, "exit_status": exits}
    if cfg.compare and decs:
        out.update(compare(cfg, model, split, frame_ids, collector.results, t1, t2))
    out["seconds"] = round(time.time() - t_start, 1)
    return out


class ThreadRoles:
    """Cameras, aggregators and workers as threads of this process (`--no-processes`), the
    cameras gated by a window of frames in flight."""

    def __init__(self, cfg: ReplayConfig, model: AdaDDNN, site: str, mqtt_url: str, redis_url: str,
                 cams: tuple[int, ...], stop_at: int, t1: float | None, t2: float, split, gate) -> None:
        self.workers = [Worker(CloudConfig(site=site, mqtt_url=mqtt_url, redis_url=redis_url,
                                           checkpoint=cfg.checkpoint, batch=cfg.cloud_batch, wait_ms=cfg.cloud_wait_ms,
                                           device=cfg.cloud_device, service_id=f"cloud-{i}-{uuid.uuid4().hex[:6]}"),
                               copy.deepcopy(model.cloud)) for i in range(cfg.workers)]
        self.aggs = [Aggregator(EdgeConfig(site=site, mqtt_url=mqtt_url, redis_url=redis_url,
                                           checkpoint=cfg.checkpoint, deadline_ms=cfg.deadline_ms,
                                           service_id=f"edge-{i}-{uuid.uuid4().hex[:6]}"),
                                copy.deepcopy(model.edge), t1, t2) for i in range(cfg.aggregators)]
        self.feed = CameraFeed(CameraConfig(site=site, mqtt_url=mqtt_url, checkpoint=cfg.checkpoint, data=cfg.data,
                                            split=cfg.split, start=cfg.start, stop=stop_at, fps=cfg.fps,
                                            wire_dtype=cfg.wire_dtype, batch=cfg.camera_batch, cameras=cams,
                                            overload="wait"),
                               {k: copy.deepcopy(model.cameras[k]) for k in cams}, split, gate=gate)
        self.error: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def start(self, r: redis.Redis, stop: threading.Event) -> None:
        for w in self.workers:
            w.start()
        for a in self.aggs:
            a.start()

        def cameras() -> None:
            try:
                self.feed.connect()
                self.feed.run(stop)
                self.feed.close()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error.append(err)

        self.thread = threading.Thread(target=cameras, name="cameras", daemon=True)
        self.thread.start()

    def cameras_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def check_cameras(self) -> None:
        if self.error:
            raise ReplayError(f"the cameras failed: {self.error[0]}") from self.error[0]

    def stop(self) -> dict[str, int]:
        for a in self.aggs:
            a.stop()
        for w in self.workers:
            w.stop()
        return {}


class ProcessRoles:
    """Cameras, aggregators and workers as separate `ada-ddnn` processes, as deployed (the
    default): no role shares another's interpreter lock. The cameras run at full speed (or
    --fps) and hold back while an aggregator reports observations reaching it --overload-lag-ms
    late (lossless flow control), in place of the in-process window."""

    def __init__(self, cfg: ReplayConfig, model: AdaDDNN, site: str, mqtt_url: str, redis_url: str,
                 cams: tuple[int, ...], stop_at: int, t1: float | None, t2: float, split, gate) -> None:
        self.cfg, self.site, self.cams, self.stop_at, self.t1, self.t2 = cfg, site, cams, stop_at, t1, t2
        self.brokers = ["--site", site, "--mqtt-url", mqtt_url, "--threads", "1"]
        self.redis_url = redis_url
        self.log_dir = tempfile.mkdtemp(prefix=f"ada-ddnn-{site}-")
        self.procs: list[RoleProcess] = []
        self.cameras: RoleProcess | None = None

    def start(self, r: redis.Redis, stop: threading.Event) -> None:
        cfg, tag = self.cfg, uuid.uuid4().hex[:6]
        common = [*self.brokers, "--redis-url", self.redis_url, "--checkpoint", cfg.checkpoint]
        thresholds_args = ["--t2", repr(self.t2)] + ([] if self.t1 is None else ["--t1", repr(self.t1)])
        workers = [start_role("cloud", [*common, "--batch", str(cfg.cloud_batch), "--wait-ms", str(cfg.cloud_wait_ms),
                                        "--device", cfg.cloud_device, "--service-id", f"cloud-{i}-{tag}"],
                              self.log_dir, f"cloud-{i}") for i in range(cfg.workers)]
        aggs = [start_role("edge", [*common, *thresholds_args, "--deadline-ms", str(cfg.deadline_ms),
                                    "--service-id", f"edge-{i}-{tag}"], self.log_dir, f"edge-{i}")
                for i in range(cfg.aggregators)]
        self.procs = workers + aggs
        wait_alive(r, self.site, "cloud", workers)
        wait_alive(r, self.site, "edge", aggs)
        self.cameras = start_role("cameras", [
            *self.brokers, "--checkpoint", cfg.checkpoint, "--data", cfg.data, "--split", cfg.split,
            "--start", str(cfg.start), "--stop", str(self.stop_at), "--fps", str(cfg.fps),
            "--wire-dtype", cfg.wire_dtype, "--batch", str(cfg.camera_batch),
            "--cameras", ",".join(map(str, self.cams)), "--overload", "wait",
            "--shed-lag-ms", str(cfg.overload_lag_ms)], self.log_dir, "cameras")
        self.procs.append(self.cameras)

    def cameras_running(self) -> bool:
        for p in self.procs:
            if p is not self.cameras and not p.alive():
                raise ReplayError(f"{p.name} died (status {p.proc.returncode}):\n{p.tail()}")
        return self.cameras is not None and self.cameras.alive()

    def check_cameras(self) -> None:
        assert self.cameras is not None
        if self.cameras.proc.returncode:
            raise ReplayError(f"the cameras exited with status {self.cameras.proc.returncode}:\n"
                              f"{self.cameras.tail()}")

    def stop(self) -> dict[str, int]:
        exits = stop_all(self.procs)
        bad = {name: code for name, code in exits.items() if code != 0}
        if bad:
            log.error("roles that did not exit cleanly: %s; their logs are in %s", bad, self.log_dir)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return exits


def _clear(r: redis.Redis, site: str) -> None:
    keys = list(r.scan_iter(match=names.site_pattern(site), count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])


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
    out = run_replay(cfg)
    print(summary_table(out))
    if args.json_out:
        write_json(args.json_out, out)
    print(json.dumps(out, indent=2))
    return 0 if out["lost"] == 0 and out["duplicates"] == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `replay` to the `ada-ddnn` parser."""
    p = add_command(subparsers, "replay", ReplayConfig, main, help="the main job: cameras + edge + cloud over MQTT and "
                    "Redis, with a report", description=__doc__)
    p.add_argument("--json", dest="json_out", help="also write the JSON report here")
