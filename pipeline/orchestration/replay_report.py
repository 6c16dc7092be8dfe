"""What `ada-ddnn replay` reads and reports: the results collector (results stream and MQTT
topic), latency percentiles, the report's numbers, and the frame-by-frame comparison with
offline evaluation of the same frames."""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

import numpy as np
import paho.mqtt.client as mqtt
import redis
import torch

from edge.exits import decide, under
from edge.frame_store import wait_percentiles
from pipeline.data import Split
from pipeline.errors import MessageError
from pipeline.offline.network import AdaDDNN
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.transport.service import Backoff
from pipeline.wire import names
from pipeline.wire.messages import EXIT_NAMES, Decision

if TYPE_CHECKING:
    from pipeline.orchestration.replay import ReplayConfig

log = logging.getLogger(__name__)

GATE_WAIT_S = 5.0  # a camera waiting for room in the window re-checks at least this often
OFFLINE_BATCH = 500  # frames per offline forward pass (as `ada-ddnn evaluate`)


class ResultCollector:
    """Reads the results stream (authoritative) and counts the MQTT results topic beside it."""

    def __init__(self, r: redis.Redis, mqtt_url: str, site: str, frame_ids: range) -> None:
        self.r, self.site, self.frame_ids = r, site, frame_ids
        self.stream = names.results_stream(site)
        self.results: dict[int, Decision] = {}
        self.extra = 0  # results beyond the first for a frame
        self.foreign = 0  # results for frames this replay did not send
        self.mqtt_counts: dict[int, int] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"results-{site}", daemon=True)
        self._last_id = "0-0"
        self.mqtt = mqtt_client(mqtt_url, f"{site}-results-{uuid.uuid4().hex[:6]}",
                                on_connect=lambda c: c.subscribe(names.results_topic(site), qos=1),
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
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                resp = self.r.xread({self.stream: self._last_id}, count=500, block=200)
            except redis.RedisError as err:  # Redis restarting: read on from the last entry once it is back
                wait_s = backoff.next()
                log.warning("site %r: results stream unreadable (%s); again in %.1f s", self.site, err, wait_s)
                self._stop.wait(wait_s)
                continue
            backoff.reset()
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

    def complete(self) -> bool:
        """Every frame of the replay has its result."""
        with self.cond:
            return len(self.results) >= len(self.frame_ids)

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
    """Offline evaluation (`pipeline.offline.evaluation`) of `split` with the given camera mask."""
    from pipeline.offline import evaluation

    cams = evaluation.camera_pass(model, split, "cpu", OFFLINE_BATCH, wire_dtype=wire_dtype)
    c = evaluation.fuse_pass(model, cams, present, "cpu", OFFLINE_BATCH)
    has_cams = c.cam_entropy is not None
    return decide(t1 if has_cams else None, t2, c.edge_entropy, c.edge_pred, c.cloud_pred, c.cam_entropy, c.cam_pred,
                  c.present)


def accuracy(decs: list[Decision]) -> float | None:
    scored = [d for d in decs if d.label is not None]
    return sum(d.prediction == d.label for d in scored) / len(scored) if scored else None


def report(cfg: ReplayConfig, model: AdaDDNN, site: str, n: int, t1, t2, decs: list[Decision],
           collector: ResultCollector, counters: dict, t_start: float, feature_wait: dict | None = None) -> dict:
    """The report's numbers, from the decisions and the site's counters in Redis (so that it
    reads the same whether the roles ran as threads or as processes); `feature_wait`: the site's
    feature-wait histogram (lazy upload)."""
    got = len(decs)
    at_edge = [d for d in decs if d.exit != "cloud"]
    at_cloud = [d for d in decs if d.exit == "cloud"]
    first = min((d.captured_at for d in decs), default=t_start)
    last = max((d.decided_at for d in decs), default=first)
    latency = {e: percentiles([d.latency_ms for d in decs if d.exit == e]) for e in EXIT_NAMES}
    latency["all"] = percentiles([d.latency_ms for d in decs])
    mqtt_missing = sum(1 for d in decs if collector.mqtt_counts.get(d.frame_id, 0) == 0)
    cams = model.cfg.num_cameras
    incomplete = {e: sum(1 for d in decs if d.exit == e and len(d.present) < cams) for e in EXIT_NAMES}
    return {
        "mode": model.cfg.mode,
        "checkpoint": cfg.checkpoint,
        "split": cfg.split,
        "n": n,
        "site": site,
        "wire_dtype": cfg.wire_dtype,
        "thresholds": {"t1": t1, "t2": t2},
        "exit_rate": {e: (sum(d.exit == e for d in decs) / got if got else None) for e in EXIT_NAMES},
        "accuracy": {"edge": accuracy(at_edge), "cloud": accuracy(at_cloud), "overall": accuracy(decs)},
        # bytes that reached the edge from the cameras (each message once: observations or
        # summaries, features, and those that came after their frame's decision), requests sent to
        # the cameras (as each camera receives them), and handed to the cloud, per frame
        "bytes_per_frame": {"camera_to_edge": _camera_bytes(counters) / max(1, n),
                            "edge_to_cameras": counters.get("request_bytes", 0) / max(1, n),
                            "edge_to_cloud": counters.get("escalated_bytes", 0) / max(1, n)},
        "link": link_report(counters, decs, n, cams),
        "edge_runs_per_100_frames": round(100 * counters.get("edge_runs", 0) / max(1, n), 2),
        "exit1_early": counters.get("exit1_early", 0),  # lazy: frames claimed at a summary under T1 before all came
        "deadline_claims": counters.get("deadline_claims", 0),  # frames claimed at the deadline with the cameras that came
        "summaries_after_exit1": counters.get("summaries_after_exit1", 0),  # lazy: after an early exit 1 (expected)
        "late_summaries": counters.get("late_summaries", 0),  # lazy: summaries that came after any other decision
        "feature_requests": counters.get("requests", 0),
        "feature_requests_void": counters.get("requests_void", 0),  # lazy: for a frame asked for or decided already
        "features_missing": counters.get("features_missing", 0),  # lazy: cameras asked that never answered in time
        "late_features": counters.get("late_features", 0),
        "frames": n,
        "results": got,
        "lost": n - got,
        "duplicates": collector.extra,  # results beyond the first for a frame in the results stream
        "late": counters.get("late", 0),
        # second attempts refused by the result/escalation markers (a slow owner after a take-over)
        "conflicts_refused": counters.get("result_conflicts", 0) + counters.get("escalation_conflicts", 0),
        "reclaimed": counters.get("reclaimed", 0),
        "claims_lost": counters.get("claims_lost", 0),
        "duplicate_observations": counters.get("duplicate_observations", 0),
        "deadletter": counters.get("deadletter", 0),
        "incomplete": sum(incomplete.values()),
        "incomplete_by_exit": incomplete,
        "mqtt_results": {"received": sum(collector.mqtt_counts.values()), "missing": mqtt_missing},
        "throughput_fps": round(got / (last - first), 1) if got and last > first else None,
        "latency_ms": latency,
        # lazy upload: request to claim of the frames whose features were asked for (the Redis clock)
        "feature_wait_ms": wait_percentiles(feature_wait or {}),
        "aggregators": cfg.aggregators,
        "workers": cfg.workers,
        "deadline_ms": cfg.deadline_ms,
        "fps": cfg.fps,
    }


def _camera_bytes(counters: dict) -> int:
    """Every message byte the cameras sent that reached the edge: observations, summaries,
    features, and those that came after their frame was decided."""
    return sum(counters.get(k, 0) for k in ("observation_bytes", "summary_bytes", "feature_bytes", "late_bytes"))


def link_report(counters: dict, decs: list[Decision], n: int, cams: int) -> dict:
    """Bytes per camera per frame on the camera links, all messages counted (camera to edge, and
    the feature requests each camera receives), averaged over all frames and by exit path. The
    split by exit counts each frame's own messages as the edge assembled them (and its request),
    and the summaries that came after an early exit 1; late messages are only in `all`, and in
    `unattributed`."""
    total = _camera_bytes(counters) + counters.get("request_bytes", 0)
    per_exit = {}
    attributed = 0
    for e in EXIT_NAMES:
        frames = sum(1 for d in decs if d.exit == e)
        b = counters.get(f"camera_bytes_{e}", 0)
        attributed += b
        per_exit[e] = round(b / (frames * cams), 1) if frames else None
    return {"bytes_per_camera_frame": {"all": round(total / max(1, n * cams), 1), **per_exit,
                                       "unattributed": round((total - attributed) / max(1, n * cams), 1)}}


def compare(cfg: ReplayConfig, model: AdaDDNN, split: Split, frame_ids: range, results: dict[int, Decision],
            t1, t2, exit_mix: bool = False) -> dict:
    """Streaming vs offline evaluation of the same frames with the same cameras present (with
    `exit_mix`, also both exit mixes and whether they are equal). Frames answered at exit 1 by a
    camera above T1 are left out (counted in `blind`): lazy upload answers a frame none of whose
    features came by its most confident camera's summary, which offline evaluation, having every
    feature, never does."""
    sub = split.slice(frame_ids.start, frame_ids.stop)
    cams = model.cfg.num_cameras
    present = torch.ones(len(sub), cams, dtype=torch.bool)
    have = torch.zeros(len(sub), dtype=torch.bool)
    s_pred = torch.full((len(sub),), -1, dtype=torch.long)
    s_exit = torch.full((len(sub),), -1, dtype=torch.long)
    s_entropy = torch.ones(len(sub))  # of the classifier that answered
    for i, f in enumerate(frame_ids):
        d = results.get(f)
        if d is None:
            continue
        have[i] = True
        present[i] = False
        present[i, list(d.present)] = True
        s_pred[i], s_exit[i] = d.prediction, EXIT_NAMES.index(d.exit)
        if d.entropy is not None:
            s_entropy[i] = d.entropy
    blind_mask = have & (s_exit == EXIT_NAMES.index("exit1")) & ~under(s_entropy, t1)
    blind = int(blind_mask.sum())
    have &= ~blind_mask
    model = copy.deepcopy(model).cpu()
    same = offline_decisions(model, sub, present, cfg.wire_dtype, t1, t2)
    labels = torch.as_tensor(sub.labels)
    equal = (same.prediction == s_pred) & (same.exit == s_exit) & have
    out = {"offline": {
        "wire_dtype": cfg.wire_dtype,
        "decisions_equal": float(equal.sum()) / max(1, int(have.sum())),
        "blind": blind,  # answered by a camera's summary after none of the frame's features came: not compared
        "mismatched_frames": [frame_ids[i] for i in (~equal & have).nonzero().flatten().tolist()[:20]],
        "accuracy": float((same.prediction[have] == labels[have]).float().mean()) if have.any() else None,
    }}
    if exit_mix:
        n = max(1, int(have.sum()))
        stream_mix = {e: int((s_exit[have] == i).sum()) / n for i, e in enumerate(EXIT_NAMES)}
        out["offline"]["exit_rate"] = {e: int((same.exit[have] == i).sum()) / n for i, e in enumerate(EXIT_NAMES)}
        out["offline"]["exit_rate_equal"] = stream_mix == out["offline"]["exit_rate"]
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
        ("bytes/frame (cam->edge, edge->cams, edge->cloud)",
         f"{report['bytes_per_frame']['camera_to_edge']:.0f} / {report['bytes_per_frame']['edge_to_cameras']:.0f} / "
         f"{report['bytes_per_frame']['edge_to_cloud']:.0f}"),
        (f"bytes/camera/frame, {report.get('upload', '?')} (all; exit1/exit2/cloud; late)",
         f"{f(report['link']['bytes_per_camera_frame']['all'])}; "
         + " / ".join(f(report["link"]["bytes_per_camera_frame"][e]) for e in EXIT_NAMES)
         # per frame of the run, of messages no decision used (after their frame's), in `all` only
         + f"; {f(report['link']['bytes_per_camera_frame'].get('unattributed'))}"),
        ("edge block runs per 100 frames", f(report["edge_runs_per_100_frames"])),
        ("throughput", f"{f(report['throughput_fps'])} frames/s"),
    ]
    for e in (*EXIT_NAMES, "all"):
        lat = report["latency_ms"][e]
        rows.append((f"latency {e} ms (p50/p95/p99)", f"{f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])}  n={lat['n']}"))
    wait = report.get("feature_wait_ms", {})
    if wait.get("n"):
        rows.append(("feature requests, wait ms (p50/p95/p99)",
                     f"{f(wait['p50'])} / {f(wait['p95'])} / {f(wait['p99'])}  n={wait['n']}"))
    if report.get("feature_requests"):
        rows.append(("feature requests / cameras missing / late answers",
                     f"{report['feature_requests']} / {report['features_missing']} / {report['late_features']}"))
    if "offline" in report:
        blind = report["offline"].get("blind", 0)
        rows.append(("decisions equal to offline", f(report["offline"]["decisions_equal"], True)
                     + (f" ({blind} answered by a camera's summary, no feature having come: not compared)" if blind else "")))
    if "offline_float32" in report:
        o = report["offline_float32"]
        rows.append(("agreement with float32 offline", f"{f(o['agreement'], True)} (accuracy {o['accuracy_diff_points']:+.2f} pts)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def sites_table(report: dict) -> str:
    """One line per site of a `replay --sites N` report: accounting, exit mix streamed and offline."""
    def mix(rates: dict | None) -> str:
        return "-" if not rates else "/".join(f"{100 * rates[e]:.1f}" for e in EXIT_NAMES)

    head = ("site", "frames", "decided", "lost", "dup", "shed", "exit1/exit2/cloud %", "offline %", "equal")
    rows = [head]
    for site, r in report["sites"].items():
        off = r.get("offline", {})
        rows.append((site, str(r["frames"]), str(r["results"]), str(r["lost"]), str(r["duplicates"]),
                     str(r["accounting"]["shed"]), mix(r["exit_rate"]), mix(off.get("exit_rate")),
                     "-" if not off else f"{100 * off['decisions_equal']:.2f}%"))
    a = report["accounting"]
    rows.append(("all", str(report["frames"]), str(report["results"]), str(report["lost"]), str(report["duplicates"]),
                 str(a["shed"]), "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
