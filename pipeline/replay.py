"""`ada-ddnn replay`, the main job: cameras + edge + cloud streaming CIFAR-10 frames end to end.

    ada-ddnn replay --checkpoint models/ada.safetensors --n 1000
    ada-ddnn replay --checkpoint models/ada.safetensors --mqtt-url mqtt://host:1883 --redis-url redis://host:6379/0 \
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
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import paho.mqtt.client as mqtt
import redis
import torch

from cloud.worker import CloudConfig, Worker
from devices.camera import CameraConfig, CameraFeed
from edge.aggregator import Aggregator, EdgeConfig, thresholds_from_card
from edge.exits import EXIT_NAMES, decide
from pipeline import topics
from pipeline.config import default_data_dir, env_default
from pipeline.data import Cifar10, Split
from pipeline.errors import ReplayError
from pipeline.messages import DTYPES, Decision, MessageError
from pipeline.network import AdaDDNN
from pipeline.runtime import close_mqtt, mqtt_client, redis_client
from pipeline.services import embedded_services

log = logging.getLogger(__name__)

GATE_WAIT_S = 5.0  # a camera waiting for room in the window re-checks at least this often
OFFLINE_BATCH = 500  # frames per offline forward pass (as `ada-ddnn evaluate`)


@dataclass(frozen=True)
class ReplayConfig:
    checkpoint: str = "models/ada.safetensors"
    data: str = field(default_factory=default_data_dir)
    split: str = "test"
    start: int = 0  # first frame of the split
    n: int = 1000  # frames to replay; 0 = to the end of the split
    fps: float = 0.0  # 0 = as fast as possible
    wire_dtype: str = "int8"
    t1: float | None = None  # None = the model card's thresholds
    t2: float | None = None
    deadline_ms: int = 50
    aggregators: int = 1
    workers: int = 1
    mqtt_url: str | None = None  # None (and no env): an embedded Mosquitto
    redis_url: str | None = None  # None (and no env): an embedded Redis
    site: str = ""  # "" = a fresh "replay-xxxxxx"
    window: int = 128  # frames in flight at most (cameras wait for results beyond it)
    camera_batch: int = 64  # frames per camera forward pass
    cloud_batch: int = 64
    cloud_wait_ms: int = 10
    cloud_device: str = "auto"
    silent: tuple[int, ...] = ()  # cameras that never publish (a dead camera)
    compare: bool = True  # also run offline evaluation of the same frames and compare
    progress: bool = True
    drain_timeout_s: float = 60.0  # after the cameras finish, wait this long for the last results
    keep_keys: bool = False  # leave the site's Redis keys for inspection
    threads: int = 1  # torch intra-op threads; the roles already run in parallel threads, and OpenMP
    # pools of several threads each, spinning against one another, ran 50x slower on a busy 2-core machine

    def __post_init__(self) -> None:
        if self.wire_dtype not in DTYPES:
            raise ValueError(f"wire_dtype must be one of {tuple(DTYPES)}")
        if self.aggregators < 1 or self.workers < 1 or self.window < 1 or self.n < 0:
            raise ValueError("need at least one aggregator, one worker, window >= 1 and n >= 0")
        if self.site:
            topics.check_site(self.site)


class ResultCollector:
    """Reads the results stream (authoritative) and counts the MQTT results topic beside it."""

    def __init__(self, r: redis.Redis, mqtt_url: str, site: str, frame_ids: range) -> None:
        self.r, self.site, self.frame_ids = r, site, frame_ids
        self.stream = topics.results_stream(site)
        self.results: dict[int, Decision] = {}
        self.extra = 0  # results beyond the first for a frame
        self.foreign = 0  # results for frames this replay did not send
        self.mqtt_counts: dict[int, int] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"results-{site}", daemon=True)
        self._last_id = "0-0"
        self.mqtt = mqtt_client(mqtt_url, f"{site}-results-{uuid.uuid4().hex[:6]}",
                                on_connect=lambda c: c.subscribe(topics.results_topic(site), qos=1),
                                on_message=self._on_mqtt)

    def _on_mqtt(self, msg: mqtt.MQTTMessage) -> None:
        try:
            dec = Decision.decode(msg.payload)
        except MessageError as err:
            log.warning("site %r: bad result on MQTT: %s", self.site, err)
            return
        with self.cond:
            self.mqtt_counts[dec.frame_id] = self.mqtt_counts.get(dec.frame_id, 0) + 1

    def start(self) -> "ResultCollector":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            resp = self.r.xread({self.stream: self._last_id}, count=500, block=200)
            for _, entries in resp or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    try:
                        dec = Decision.decode(fields[b"msg"])
                    except (MessageError, KeyError) as err:
                        log.warning("site %r: bad result in the stream: %s", self.site, err)
                        continue
                    with self.cond:
                        if dec.frame_id not in self.frame_ids:
                            self.foreign += 1
                        elif dec.frame_id in self.results:
                            self.extra += 1
                        else:
                            self.results[dec.frame_id] = dec
                        self.cond.notify_all()

    def gate(self, published: int, window: int, stop: threading.Event) -> None:
        """Block a camera until fewer than `window` of the `published` frames lack a result."""
        with self.cond:
            while not stop.is_set() and published - len(self.results) >= window:
                if not self.cond.wait(GATE_WAIT_S):
                    log.warning("site %r: no result for %.0fs with %d frames in flight", self.site, GATE_WAIT_S,
                                published - len(self.results))
                    return

    def wait_all(self, deadline: float, tick: Callable[[], None]) -> None:
        with self.cond:
            while len(self.results) < len(self.frame_ids) and time.monotonic() < deadline:
                self.cond.wait(min(0.25, max(0.0, deadline - time.monotonic())))
                tick()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        close_mqtt(self.mqtt)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2), "n": len(values)}


@torch.no_grad()
def offline_decisions(model: AdaDDNN, split: Split, present: torch.Tensor, wire_dtype: str | None,
                      t1: float | None, t2: float):
    """Offline evaluation (`pipeline.evaluation`) of `split` with the given camera mask."""
    from pipeline import evaluation

    cams = evaluation.camera_pass(model, split, "cpu", OFFLINE_BATCH, wire_dtype=wire_dtype)
    c = evaluation.fuse_pass(model, cams, present, "cpu", OFFLINE_BATCH)
    has_cams = c.cam_entropy is not None
    return decide(t1 if has_cams else None, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred,
                  c.present)


def _accuracy(decs: list[Decision]) -> float | None:
    scored = [d for d in decs if d.label is not None]
    return sum(d.prediction == d.label for d in scored) / len(scored) if scored else None


def run_replay(cfg: ReplayConfig, data: Cifar10 | None = None, model: AdaDDNN | None = None) -> dict:
    """Run the whole pipeline over the frames `cfg` names and return the JSON report."""
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_replay(cfg, data, model)
    finally:
        torch.set_num_threads(threads_before)


def _run_replay(cfg: ReplayConfig, data: Cifar10 | None, model: AdaDDNN | None) -> dict:
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_cifar10

    t_start = time.time()
    model = model if model is not None else load_checkpoint(cfg.checkpoint)
    data = data if data is not None else load_cifar10(cfg.data)
    split = data.split(cfg.split)
    stop_at = len(split) if cfg.n == 0 else cfg.start + cfg.n
    if stop_at > len(split) or cfg.start >= stop_at:
        raise ReplayError(f"frames {cfg.start}..{stop_at} are not in the {cfg.split} split of {len(split)}")
    frame_ids = range(cfg.start, stop_at)
    n = len(frame_ids)
    t1, t2 = thresholds_from_card(cfg.checkpoint, cfg.t1, cfg.t2, model.cfg.mode)
    site = cfg.site or f"replay-{uuid.uuid4().hex[:8]}"
    cams = tuple(k for k in range(model.cfg.num_cameras) if k not in cfg.silent)
    mqtt_url = cfg.mqtt_url or env_default("MQTT_URL", None)
    redis_url = cfg.redis_url or env_default("REDIS_URL", None)
    embedded = {"mqtt": mqtt_url is None, "redis": redis_url is None}

    with embedded_services(mqtt_url, redis_url) as (mqtt_url, redis_url):
        r = redis_client(redis_url)
        _clear(r, site)
        collector = ResultCollector(r, mqtt_url, site, frame_ids).start()
        workers = [Worker(CloudConfig(site=site, mqtt_url=mqtt_url, redis_url=redis_url, checkpoint=cfg.checkpoint,
                                      batch=cfg.cloud_batch, wait_ms=cfg.cloud_wait_ms, device=cfg.cloud_device,
                                      service_id=f"cloud-{i}-{uuid.uuid4().hex[:6]}"), copy.deepcopy(model)).start()
                   for i in range(cfg.workers)]
        aggs = [Aggregator(EdgeConfig(site=site, mqtt_url=mqtt_url, redis_url=redis_url, checkpoint=cfg.checkpoint,
                                      deadline_ms=cfg.deadline_ms, service_id=f"edge-{i}-{uuid.uuid4().hex[:6]}"),
                           copy.deepcopy(model), t1, t2).start()
                for i in range(cfg.aggregators)]
        stop = threading.Event()
        feed = CameraFeed(CameraConfig(site=site, mqtt_url=mqtt_url, checkpoint=cfg.checkpoint, data=cfg.data,
                                       split=cfg.split, start=cfg.start, stop=stop_at, fps=cfg.fps,
                                       wire_dtype=cfg.wire_dtype, batch=cfg.camera_batch, cameras=cams),
                          copy.deepcopy(model), split, gate=lambda done: collector.gate(done, cfg.window, stop))
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
            acc = _accuracy(decs)
            bar.set_postfix_str(" ".join(f"{e} {v:.0%}" for e, v in mix.items()) +
                                (f" acc {acc:.2%}" if acc is not None else ""))

        camera_error: list[BaseException] = []

        def cameras() -> None:
            try:
                feed.connect()
                feed.run(stop)
                feed.close()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
                camera_error.append(err)

        t_cams = threading.Thread(target=cameras, name=f"cameras-{site}", daemon=True)
        t_cams.start()
        try:
            while t_cams.is_alive():
                t_cams.join(timeout=0.25)
                tick()
            if camera_error:
                raise ReplayError(f"site {site!r}: the cameras failed: {camera_error[0]}") from camera_error[0]
            collector.wait_all(time.monotonic() + cfg.drain_timeout_s + cfg.deadline_ms / 1000, tick)
            tick()
        finally:
            stop.set()
            if bar is not None:
                bar.close()
            for a in aggs:
                a.stop()
            for w in workers:
                w.stop()
            collector.close()
        counters = {k.decode(): int(v) for k, v in r.hgetall(topics.counters_key(site)).items()}
        if not cfg.keep_keys:
            _clear(r, site)
        r.close()

    decs = [collector.results[f] for f in frame_ids if f in collector.results]
    report = _report(cfg, model, site, n, t1, t2, decs, collector, feed, aggs, counters, t_start)
    report["services"] = {"mqtt_url": mqtt_url, "redis_url": redis_url, "embedded": embedded}
    if cfg.compare and decs:
        report.update(_compare(cfg, model, split, frame_ids, collector.results, t1, t2))
    report["seconds"] = round(time.time() - t_start, 1)
    return report


def _clear(r: redis.Redis, site: str) -> None:
    keys = list(r.scan_iter(match=topics.site_pattern(site), count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])


def _bar(n: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="frame", desc="replay", dynamic_ncols=True)


def _report(cfg: ReplayConfig, model: AdaDDNN, site: str, n: int, t1, t2, decs: list[Decision],
            collector: ResultCollector, feed: CameraFeed, aggs: list[Aggregator], counters: dict, t_start: float) -> dict:
    got = len(decs)
    at_edge = [d for d in decs if d.exit != "cloud"]
    at_cloud = [d for d in decs if d.exit == "cloud"]
    first = feed.stats.first_capture or t_start
    last = max((d.decided_at for d in decs), default=first)
    latency = {e: percentiles([d.latency_ms for d in decs if d.exit == e]) for e in EXIT_NAMES}
    latency["all"] = percentiles([d.latency_ms for d in decs])
    mqtt_missing = sum(1 for d in decs if collector.mqtt_counts.get(d.frame_id, 0) == 0)
    return {
        "mode": model.cfg.mode,
        "checkpoint": cfg.checkpoint,
        "split": cfg.split,
        "n": n,
        "site": site,
        "wire_dtype": cfg.wire_dtype,
        "thresholds": {"t1": t1, "t2": t2},
        "exit_rate": {e: (sum(d.exit == e for d in decs) / got if got else None) for e in EXIT_NAMES},
        "accuracy": {"edge": _accuracy(at_edge), "cloud": _accuracy(at_cloud), "overall": _accuracy(decs)},
        "bytes_per_frame": {"camera_to_edge": feed.stats.bytes / max(1, feed.stats.frames),
                            "edge_to_cloud": sum(a.stats.escalated_bytes for a in aggs) / max(1, feed.stats.frames)},
        "frames": feed.stats.frames,
        "results": got,
        "lost": feed.stats.frames - got,
        "duplicates": collector.extra,  # results beyond the first for a frame in the results stream
        "late": counters.get("late", 0),
        # second attempts refused by the result/escalation markers (a slow owner after a take-over)
        "conflicts_refused": counters.get("result_conflicts", 0) + counters.get("escalation_conflicts", 0),
        "reclaimed": counters.get("reclaimed", 0),
        "claims_lost": counters.get("claims_lost", 0),
        "duplicate_observations": counters.get("duplicate_observations", 0),
        "deadletter": counters.get("deadletter", 0),
        "incomplete": sum(1 for d in decs if len(d.present) < model.cfg.num_cameras),
        "mqtt_results": {"received": sum(collector.mqtt_counts.values()), "missing": mqtt_missing},
        "throughput_fps": round(got / (last - first), 1) if got and last > first else None,
        "latency_ms": latency,
        "aggregators": cfg.aggregators,
        "workers": cfg.workers,
        "deadline_ms": cfg.deadline_ms,
        "fps": cfg.fps,
    }


def _compare(cfg: ReplayConfig, model: AdaDDNN, split: Split, frame_ids: range, results: dict[int, Decision],
             t1, t2) -> dict:
    """Streaming vs offline evaluation of the same frames with the same cameras present."""
    sub = split.slice(frame_ids.start, frame_ids.stop)
    cams = model.cfg.num_cameras
    present = torch.ones(len(sub), cams, dtype=torch.bool)
    have = torch.zeros(len(sub), dtype=torch.bool)
    s_pred = torch.full((len(sub),), -1, dtype=torch.long)
    s_exit = torch.full((len(sub),), -1, dtype=torch.long)
    for i, f in enumerate(frame_ids):
        d = results.get(f)
        if d is None:
            continue
        have[i] = True
        present[i] = False
        present[i, list(d.present)] = True
        s_pred[i], s_exit[i] = d.prediction, EXIT_NAMES.index(d.exit)
    model = copy.deepcopy(model).cpu()
    same = offline_decisions(model, sub, present, cfg.wire_dtype, t1, t2)
    labels = torch.as_tensor(sub.labels)
    equal = (same.prediction == s_pred) & (same.exit == s_exit) & have
    out = {"offline": {
        "wire_dtype": cfg.wire_dtype,
        "decisions_equal": float(equal.sum()) / max(1, int(have.sum())),
        "mismatched_frames": [frame_ids[i] for i in (~equal & have).nonzero().flatten().tolist()[:20]],
        "accuracy": float((same.prediction[have] == labels[have]).float().mean()) if have.any() else None,
    }}
    if cfg.wire_dtype != "float32":
        ref = offline_decisions(model, sub, present, None, t1, t2)
        acc_ref = float((ref.prediction[have] == labels[have]).float().mean())
        acc_stream = float((s_pred[have] == labels[have]).float().mean())
        out["offline_float32"] = {
            "agreement": float((ref.prediction[have] == s_pred[have]).float().mean()),
            "exit_agreement": float((ref.exit[have] == s_exit[have]).float().mean()),
            "accuracy": acc_ref,
            "accuracy_diff_points": round(100 * (acc_stream - acc_ref), 3),
        }
    return out


def summary_table(report: dict) -> str:
    def f(x, pct=False):
        if x is None:
            return "-"
        return f"{100 * x:.2f}%" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))

    rows = [
        ("frames / results", f"{report['frames']} / {report['results']}"),
        ("lost / duplicates / late", f"{report['lost']} / {report['duplicates']} / {report['late']}"),
        ("exit mix (exit1/exit2/cloud)", " / ".join(f(report["exit_rate"][e], True) for e in EXIT_NAMES)),
        ("accuracy (edge/cloud/overall)", " / ".join(f(report["accuracy"][k], True) for k in ("edge", "cloud", "overall"))),
        ("bytes/frame (cam->edge, edge->cloud)",
         f"{report['bytes_per_frame']['camera_to_edge']:.0f} / {report['bytes_per_frame']['edge_to_cloud']:.0f}"),
        ("throughput", f"{f(report['throughput_fps'])} frames/s"),
    ]
    for e in (*EXIT_NAMES, "all"):
        lat = report["latency_ms"][e]
        rows.append((f"latency {e} ms (p50/p95/p99)", f"{f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])}  n={lat['n']}"))
    if "offline" in report:
        rows.append(("decisions equal to offline", f(report["offline"]["decisions_equal"], True)))
    if "offline_float32" in report:
        o = report["offline_float32"]
        rows.append(("agreement with float32 offline", f"{f(o['agreement'], True)} (accuracy {o['accuracy_diff_points']:+.2f} pts)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- CLI ----------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    d = ReplayConfig()
    p.add_argument("--checkpoint", default=env_default("CHECKPOINT", d.checkpoint),
                   help="weights (.safetensors) (env ADA_DDNN_CHECKPOINT; default %(default)s)")
    p.add_argument("--data", default=default_data_dir(), help="CIFAR-10 folder (env ADA_DDNN_DATA; default %(default)s)")
    p.add_argument("--split", default=d.split, choices=("train", "val", "test"))
    p.add_argument("--start", type=int, default=d.start, help="first frame of the split")
    p.add_argument("--n", type=int, default=d.n, help="frames to replay, 0 = to the end (default %(default)s)")
    p.add_argument("--fps", type=float, default=d.fps, help="frames per second, 0 = as fast as possible")
    p.add_argument("--wire-dtype", choices=tuple(DTYPES), default=env_default("WIRE_DTYPE", d.wire_dtype),
                   help="feature dtype on the wire (env ADA_DDNN_WIRE_DTYPE; default %(default)s)")
    p.add_argument("--t1", type=float, default=None, help="exit 1 threshold (default: the model card's)")
    p.add_argument("--t2", type=float, default=None, help="exit 2 threshold (default: the model card's)")
    p.add_argument("--deadline-ms", type=int, default=env_default("DEADLINE_MS", d.deadline_ms),
                   help="edge deadline after a frame's first observation (env ADA_DDNN_DEADLINE_MS)")
    p.add_argument("--aggregators", type=int, default=d.aggregators, help="edge aggregators (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="cloud workers (default %(default)s)")
    p.add_argument("--mqtt-url", default=env_default("MQTT_URL", None),
                   help="Mosquitto (env ADA_DDNN_MQTT_URL); with neither URL an embedded broker is started")
    p.add_argument("--redis-url", default=env_default("REDIS_URL", None),
                   help="Redis (env ADA_DDNN_REDIS_URL); with neither URL an embedded server is started")
    p.add_argument("--site", default="", help="site id (default: a fresh replay-xxxxxxxx)")
    p.add_argument("--window", type=int, default=d.window, help="frames in flight at most (default %(default)s)")
    p.add_argument("--cloud-device", default=env_default("CLOUD_DEVICE", d.cloud_device),
                   help="auto, cpu, cuda (env ADA_DDNN_CLOUD_DEVICE)")
    p.add_argument("--silent", type=int, nargs="*", default=[], help="camera ids that never publish")
    p.add_argument("--no-compare", dest="compare", action="store_false", help="skip the offline comparison")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")
    p.add_argument("--threads", type=int, default=env_default("THREADS", d.threads),
                   help="torch intra-op threads, 0 = torch's default (env ADA_DDNN_THREADS; default %(default)s)")
    p.add_argument("--json", dest="json_out", help="also write the JSON report here")


def main(args: argparse.Namespace) -> int:
    cfg = ReplayConfig(checkpoint=args.checkpoint, data=args.data, split=args.split, start=args.start, n=args.n,
                       fps=args.fps, wire_dtype=args.wire_dtype, t1=args.t1, t2=args.t2, deadline_ms=args.deadline_ms,
                       aggregators=args.aggregators, workers=args.workers, mqtt_url=args.mqtt_url,
                       redis_url=args.redis_url, site=args.site, window=args.window, cloud_device=args.cloud_device,
                       silent=tuple(args.silent), compare=args.compare, progress=args.progress,
                       threads=args.threads)
    report = run_replay(cfg)
    print(summary_table(report))
    text = json.dumps(report, indent=2)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if report["lost"] == 0 and report["duplicates"] == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `replay` to the `ada-ddnn` parser."""
    p = subparsers.add_parser("replay", help="the main job: cameras + edge + cloud over MQTT and Redis, with a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=main)
