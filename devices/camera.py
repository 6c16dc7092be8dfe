"""A camera process: replays CIFAR-10 frames as a camera feed, runs its camera module, publishes.

    ada-ddnn camera --cam 0 --checkpoint models/ada.safetensors --fps 10
    ada-ddnn cameras --checkpoint models/ada.safetensors --start 0 --stop 1000   # all six, one process
    ada-ddnn camera --cam 0 --check                                             # 0 if camera 0 is online
    ada-ddnn export --checkpoint models/ada.safetensors --parts parts/   # then, on camera 3's device:
    ada-ddnn camera --cam 3 --checkpoint parts/camera3.safetensors       # only its own weights

Each frame of the split (test by default, or --start/--stop) is a scene; camera k applies its
view (`devices.views.camera_view`), runs `CameraModule` k (the only part of the checkpoint it
reads) and publishes a `CameraObservation` (features int8 by default) on
`ada/{site}/cam/{k}/obs` with QoS 1. The frame id is the frame's index in the split, so every
camera names the same scene alike. Liveness: each camera's MQTT client keeps a retained status
("online", then "done") with "offline" as its last will.

At a set --fps the cameras of a site share a clock (retained on `ada/{site}/clock`: frame i is
captured at epoch + (i - start) / fps), so cameras started separately capture the same frame at
the same moment. The frames that are due are computed together (a camera that fell behind
catches up in batches of up to --batch, each frame keeping its capture time); a frame due more
than --max-lag-ms ago is shed instead. Every 5 s the process logs its achieved rate, and warns
with numbers when it is behind. At --fps 0 (as fast as possible) frames go through the module
in batches of --batch. `forward_rows` keeps every batch size bit-identical to offline evaluation.

Upload (--upload): eager sends each frame's features with its observation. Lazy (the default for
ADA-DDNN checkpoints, `auto`) sends a `CameraSummary` (prediction and entropy, about a tenth of an
int8 observation) and keeps the encoded features (at most --feature-cache frames, for
--feature-ttl-ms): the edge asks for them (`FeatureRequest` on `ada/{site}/edge/request`, which
the process's first camera client subscribes to) only for frames that do not leave at exit 1,
and each camera named answers on `ada/{site}/cam/{k}/feat` from paho's network thread (a
dictionary look-up and a queued publish). A request for features no longer kept is counted and
logged; the edge decides that frame without them at its second deadline. After its last frame a
lazy camera keeps answering until no request came for --linger-ms. DDNN cameras have no
classifier, so nothing to decide exit 1 from: they always upload eagerly.

Overload: the aggregators publish how late observations reach them (`ada/{site}/edge/flow/+`);
while one reports --shed-lag-ms or more, the cameras send only a share of their frames that
follows that lag (`admit`), or with --overload wait hold back. Every frame a camera does not
send is named, by id and reason, in a ShedNotice on `ada/{site}/cam/{k}/shed`, which the edge
records in `ada:{site}:losses`.

Broker crash: a QoS 1 PUBACK means the broker holds a message in memory, not on disk. After a
reconnect each camera publishes again what the broker acknowledged in the last --resend-ms before
the connection was lost (`MqttClient(resend_s=...)`); the edge drops what it already has.
"""

from __future__ import annotations

import argparse
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as mqtt
import torch

from devices.camera_net import CameraModule, load_camera
from devices.site_signals import SiteSignals
from devices.views import camera_view, normalize
from pipeline.checkpoint import read_config
from pipeline.compute import resolve_device, set_threads
from pipeline.config import MODEL_WIRE_DTYPE, default_data_dir, resolve_wire_dtype
from pipeline.data import SPLITS, Split, load_cifar10, to_float
from pipeline.entropy import normalized_entropy
from pipeline.errors import CameraError, ConnectError, MessageError
from pipeline.layers import forward_rows
from pipeline.settings import DEFAULT_MQTT_URL, add_command, check_fields, config_from_args, printed
from pipeline.throttle import Throttle
from pipeline.transport.metrics import RoleMetrics, Sample, sample
from pipeline.transport.mqtt_client import MqttClient, close_mqtt, mqtt_client
from pipeline.transport.service import serve
from pipeline.wire import names
from pipeline.wire.control import MAX_SHED_IDS, ShedNotice, SiteClock, check_fps
from pipeline.wire.messages import (
    DTYPES,
    CameraFeatures,
    CameraObservation,
    CameraStatus,
    FeatureRequest,
    FeatureTensor,
    summary_of,
)

log = logging.getLogger(__name__)

RATE_REPORT_S = 5.0  # how often a paced camera process reports its achieved rate
OVERLOAD_POLL_S = 0.01  # how often a camera held back by an overloaded edge looks again
CLOCK_WAIT_S = 0.5  # wait this long for the site's retained clock before announcing one
CLOCK_LEAD_S = 0.5  # a new clock starts this far in the future, so every camera can join in time
BAD_REQUEST_LOG_S = 10.0  # a bad feature request is logged at most this often (each one is counted)
RESEND_WAIT_S = 10.0  # after a reconnect, resend once an aggregator's live flow status shows it is back, or after this
CLOCK_AHEAD_MAX_S = 5.0  # a retained site clock starting further ahead than this is not joined (a camera's clock is wrong)
PUBLISH_TIMEOUT_S = 30.0  # at the end, wait this long for the broker to acknowledge what is still in flight
MAX_BACKLOG = 4096  # at full speed, observations in flight (unacknowledged) before the feed waits for the broker
UPLOADS = ("auto", "lazy", "eager")
EDGE_DEFAULT_WAIT_MS = 1050  # the edge's default --deadline-ms + --request-deadline-ms: keep features at least this long


@dataclass(frozen=True)
class CameraConfig:
    """One camera process (or several cameras in one process)."""

    site: str = "site0"  # site id: prefix of every topic and key
    mqtt_url: str = DEFAULT_MQTT_URL  # Mosquitto, mqtt://host:port
    checkpoint: str = "models/ada.safetensors"  # weights (.safetensors): the full checkpoint or this camera's part
    data: str = field(default_factory=default_data_dir)  # folder holding cifar-10-batches-py/
    split: str = field(default="test", metadata={"choices": SPLITS})  # which CIFAR-10 split the feed replays
    start: int = field(default=0, metadata={"min": 0})  # first frame (index into the split)
    stop: int = field(default=0, metadata={"min": 0})  # one past the last frame; 0 = the end of the split
    fps: float = field(default=0.0, metadata={"min": 0})  # frames per second; 0 = as fast as possible
    wire_dtype: str = field(default=MODEL_WIRE_DTYPE, metadata={"choices": (MODEL_WIRE_DTYPE, *DTYPES)})  # code of the features on the wire; model = the one the checkpoint was trained for (int8 if none)
    batch: int = field(default=64, metadata={"min": 1, "max": 10_000})  # frames per forward pass at fps 0
    device: str = "cpu"  # cpu, cuda or auto, for the camera modules
    threads: int = field(default=0, metadata={"min": 0})  # torch CPU threads; 0 = torch's default
    labels: bool = True  # attach the ground truth (replays score accuracy with it)
    cameras: tuple[int, ...] = field(default=(0,), metadata={"flags": ["--cameras", "--cams"], "min": 0})  # camera ids this process runs, comma-separated
    max_lag_ms: int = field(default=200, metadata={"min": 1, "max": 86400000})  # at a set fps, a frame due longer ago than this (ms) is shed instead of sent late (the edge would have decided it)
    shed_lag_ms: int = field(default=2000, metadata={"min": 0, "max": 86400000})  # overload: an aggregator reports observations reaching it this late (ms); 0 = never
    metrics_port: int = field(default=0, metadata={"min": 0, "max": 65535})  # serve Prometheus /metrics on this TCP port; 0 = off
    metrics_host: str = "127.0.0.1"  # address /metrics listens on (0.0.0.0: a scraper on another host)
    overload: str = field(default="shed", metadata={"choices": ("shed", "wait")})  # under overload (and when behind schedule): shed frames, named; or wait (lossless, for replays and benchmarks)
    upload: str = field(default="auto", metadata={"choices": UPLOADS})  # lazy: a summary per frame, the features only when the edge asks; eager: the features with every observation; auto: lazy for ADA-DDNN checkpoints, eager for DDNN (no camera classifiers)
    feature_cache: int = field(default=4096, metadata={"min": 1})  # lazy upload: frames whose encoded features each camera keeps for the edge's requests, at most
    feature_ttl_ms: int = field(default=10_000, metadata={"min": 1, "max": 86400000})  # lazy upload: how long (ms) a camera keeps a frame's features; keep it above the edge's deadline + request deadline + its lag
    linger_ms: int = field(default=2000, metadata={"min": 0, "max": 86400000})  # lazy upload: after the last frame, keep answering requests until none came for this long (ms)
    resend_ms: int = field(default=10_000, metadata={"min": 0, "max": 86400000})  # after a reconnect, publish again what the broker acknowledged this long (ms) before the connection was lost: a broker that crashed lost what it had not saved (keep it above Mosquitto's autosave_interval); 0 = off

    def __post_init__(self) -> None:
        check_fields(self)  # choices and ranges, as declared on the fields
        names.check_site(self.site)
        if self.stop and self.stop <= self.start:
            raise ValueError(f"stop must be above start (or 0: the end of the split), got start {self.start}, "
                             f"stop {self.stop}")
        check_fps(self.fps)
        if not self.cameras:
            raise ValueError("no camera to run")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"camera ids are 0 or more, each once, got {list(self.cameras)}")


@dataclass
class CameraStats:
    frames: int = 0
    published: int = 0
    bytes: int = 0  # encoded observation (or summary) bytes published
    requests: int = 0  # lazy upload: feature requests received that named one of this process's cameras
    features_sent: int = 0  # lazy upload: feature answers published
    feature_bytes: int = 0  # their encoded bytes
    request_misses: int = 0  # lazy upload: features asked for that were no longer (or never) kept
    bad_requests: int = 0  # requests that failed validation (logged, ignored)
    unacknowledged: int = 0  # observations the broker had not acknowledged when the camera stopped
    denied: int = 0  # publishes the broker refused in its acknowledgement (its ACL): they went nowhere
    refused: int = 0  # observations dropped because too many were waiting for the broker (named in the log)
    shed: dict[str, int] = field(default_factory=dict)  # frames not sent, by reason (each named in a ShedNotice)
    first_capture: float | None = None
    seconds: float = 0.0
    achieved_fps: float = 0.0  # frames captured per second over the run


class FeatureCache:
    """Lazy upload: the encoded CameraFeatures of recent frames, by (camera, frame id), bounded by
    count and age. Filled by the feed's thread, read by paho's network thread (a lock each way)."""

    def __init__(self, max_frames: int, ttl_s: float) -> None:
        self.max_frames, self.ttl_s = max_frames, ttl_s
        self._items: collections.OrderedDict[tuple[int, int], tuple[float, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, camera: int, frame_id: int, raw: bytes, cameras: int = 1) -> None:
        """Keep `raw`; `cameras` (the process's cameras) scales the count bound to frames."""
        now = time.monotonic()
        with self._lock:
            self._items[(camera, frame_id)] = (now, raw)
            limit = self.max_frames * cameras
            while self._items and (len(self._items) > limit or next(iter(self._items.values()))[0] < now - self.ttl_s):
                self._items.popitem(last=False)

    def get(self, camera: int, frame_id: int) -> bytes | None:
        with self._lock:
            item = self._items.get((camera, frame_id))
        if item is None or item[0] < time.monotonic() - self.ttl_s:
            return None
        return item[1]

    def __len__(self) -> int:
        return len(self._items)


class CameraFeed:
    """Runs the camera modules of `cfg.cameras` over a split and publishes their observations.

    Every camera has its own MQTT client (its own session, status and last will); the modules
    run in this thread. `gate(frames_published)` is called before each batch: the replay uses it
    to keep a bounded number of frames in flight."""

    def __init__(self, cfg: CameraConfig, modules: dict[int, CameraModule], split: Split,
                 gate: Callable[[int], None] | None = None) -> None:
        if set(modules) != set(cfg.cameras):
            raise CameraError(cfg.site, None, f"modules for cameras {sorted(modules)}, config names {list(cfg.cameras)}")
        self.device = resolve_device(cfg.device)
        self.split = split
        self.modules = {k: m.to(self.device).eval() for k, m in modules.items()}
        self.net = next(iter(modules.values())).cfg  # the network's ModelConfig
        self.wire_dtype = resolve_wire_dtype(cfg.wire_dtype, self.net)
        self._init_feed(cfg, len(split), gate)
        self.lazy = resolve_upload(cfg.upload, self.net.has_camera_classifiers, cfg.site) == "lazy"

    def _init_feed(self, cfg: CameraConfig, frames: int, gate: Callable[[int], None] | None) -> None:
        """The feed's state, whatever produces its observations (`encode`)."""
        self.cfg, self.gate = cfg, gate
        self.stop_at = cfg.stop or frames
        if self.stop_at > frames or cfg.start >= self.stop_at:
            raise CameraError(cfg.site, None, f"frames {cfg.start}..{self.stop_at} outside the split of {frames}")
        self.stats = CameraStats()
        self.clients: dict[int, MqttClient] = {}
        self.stopped_early = False  # set by run(): stopped (a signal, `stop`) before the last frame
        self.signals = SiteSignals(cfg.site, cfg.shed_lag_ms, on_live_flow=self._aggregator_back)
        self._shed_log = Throttle(RATE_REPORT_S)  # at most one shedding line per report period
        self._refused: dict[int, list[int]] = {}  # camera -> frame ids dropped while the broker was away
        self.metrics = RoleMetrics(self.metric_samples)
        self.lazy = False  # lazy upload: summaries first, features on request (set by __init__)
        self.cache = FeatureCache(cfg.feature_cache, cfg.feature_ttl_ms / 1000)
        self._last_request = time.monotonic()
        self.release = threading.Event()  # set by whoever knows every frame is decided: stop lingering now
        self._miss_log = Throttle(RATE_REPORT_S)
        self._bad_request_log = Throttle(BAD_REQUEST_LOG_S)

    def metric_samples(self) -> list[Sample]:
        st, site = self.stats, self.cfg.site
        out = [sample("ada_camera_frames", st.frames, site=site),
               sample("ada_camera_published", st.published, site=site),
               sample("ada_camera_bytes", st.bytes, site=site),
               sample("ada_camera_refused", st.refused,
                       site=site),
               sample("ada_camera_feature_requests", st.requests, site=site),
               sample("ada_camera_feature_bytes", st.feature_bytes,
                       site=site),
               sample("ada_camera_request_misses", st.request_misses, site=site),
               sample("ada_camera_bad_requests", st.bad_requests, site=site)]
        out.append(sample("ada_camera_resent", sum(c.resent for c in self.clients.values()), site=site))
        out.append(sample("ada_camera_control_ignored", self.signals.refused, site=site))
        out += [sample("ada_frames_shed", n, site=site,
                        reason=r) for r, n in dict(st.shed).items()]
        clients = list(self.clients.values())
        out.append(sample("ada_mqtt_reconnects", sum(c.reconnects for c in clients),
                           site=site))
        out.append(sample("ada_backlog", sum(c.unconfirmed for c in clients), site=site,
                         queue="unacknowledged"))
        return out

    def connect(self) -> None:
        for k in self.cfg.cameras:
            site = self.cfg.site
            offline = CameraStatus(site, k, "offline", 0.0).encode()

            def online(c: mqtt.Client, k: int = k) -> None:
                c.publish(names.status_topic(site, k), CameraStatus(site, k, "online", time.time()).encode(),
                          qos=1, retain=True)

            control = k == self.cfg.cameras[0]  # one client per process listens to the site's control topics

            def on_connect(c: mqtt.Client, online=online, control: bool = control) -> None:
                online(c)
                if control:
                    topics = [(names.flow_filter(site), 0), (names.clock_topic(site), 1)]
                    c.subscribe(topics + ([(names.request_topic(site), 1)] if self.lazy else []))

            self.clients[k] = mqtt_client(self.cfg.mqtt_url, f"{site}-cam{k}-{id(self):x}", on_connect=on_connect,
                                          on_message=self.on_control if control else None,
                                          will=(names.status_topic(site, k), offline),
                                          resend_s=self.cfg.resend_ms / 1000, resend_after=RESEND_WAIT_S)

    def _aggregator_back(self) -> None:
        """A flow status published now (not a retained one): an aggregator is connected and
        subscribed, so a resend held since a reconnect reaches it (paho's network thread)."""
        for client in list(self.clients.values()):
            client.release_resend()

    def on_control(self, msg: mqtt.MQTTMessage) -> None:
        """The site's control topics (paho's network thread): feature requests, else the clock and
        the edge's flow status."""
        if msg.topic == names.request_topic(self.cfg.site):
            self.answer(msg.payload)
        else:
            self.signals.on_message(msg)

    def answer(self, payload: bytes) -> None:
        """Lazy upload: publish the features a FeatureRequest asks of this process's cameras. A bad
        request is logged and ignored; features no longer kept are counted (the edge decides the
        frame without them at its second deadline)."""
        site = self.cfg.site
        try:
            req = FeatureRequest.decode(payload)
            if req.site != site:
                raise MessageError(f"a request of site {req.site!r}")
        except MessageError as err:
            self.stats.bad_requests += 1
            if self._bad_request_log():
                log.warning("site %r cameras %s: ignoring a bad feature request: %s (%d so far; one such line per "
                            "%.0f s)", site, list(self.cfg.cameras), err, self.stats.bad_requests, BAD_REQUEST_LOG_S)
            return
        self._last_request = time.monotonic()
        for k in req.cameras:
            client = self.clients.get(k)
            if client is None:
                continue  # another process's camera
            self.stats.requests += 1
            raw = self.cache.get(k, req.frame_id)
            if raw is None:
                self.stats.request_misses += 1
                if self._miss_log():
                    log.warning("site %r frame %d camera %d: features asked for are no longer kept (--feature-cache "
                                "%d frames, --feature-ttl-ms %d); misses so far %d", site, req.frame_id, k,
                                self.cfg.feature_cache, self.cfg.feature_ttl_ms, self.stats.request_misses)
                continue
            if client.publish(names.features_topic(site, k), raw, qos=1):
                self.stats.features_sent += 1
                self.stats.feature_bytes += len(raw)

    def overloaded(self) -> bool:
        return self.signals.overloaded()

    def admit(self, ids: list[int]) -> list[int]:
        """Shed mode: the frames of `ids` to send (`SiteSignals.split`); the rest are shed, named."""
        kept, shed = self.signals.split(ids)
        self.shed(shed, "overload")
        return kept

    def site_clock(self) -> SiteClock:
        """The site's capture schedule: the retained one if it has this fps, covers this camera's
        first frame and is not over, else a new one this process announces (two cameras starting
        at once converge on the last one the broker retained). A camera whose range begins after
        the retained run's end starts a run of its own instead of inheriting overdue slots."""
        cfg = self.cfg
        self.signals.clock_seen.wait(CLOCK_WAIT_S)  # a retained clock arrives right after subscribing
        c = self.signals.clock
        if c is not None and c.epoch > time.time() + CLOCK_AHEAD_MAX_S:
            log.warning("site %r cameras %s: the site clock retained on %s starts %.4g s ahead of this camera's clock; "
                        "not joining it (is the clock of the camera that announced it, or of this one, set?): "
                        "announcing a new one", cfg.site, list(cfg.cameras), names.clock_topic(cfg.site),
                        c.epoch - time.time())
            c = None
        if c is not None and c.fps == cfg.fps and cfg.start < c.stop and c.at(self.stop_at) > time.time():
            return c  # a run this camera's frames belong to, still going: join it (`first_own_frame`)
        if c is not None and c.fps != cfg.fps and c.at(min(c.stop, self.stop_at)) > time.time():
            log.warning("site %r cameras %s: the site clock retained on %s runs at %.4g fps, this camera at %.4g: "
                        "announcing a clock of its own, which the cameras of the running one do not follow (their "
                        "frames and this camera's will not line up into the same frames); start every camera of a "
                        "site with the same --fps", cfg.site, list(cfg.cameras), names.clock_topic(cfg.site), c.fps,
                        cfg.fps)
        if c is not None and (ran := self._ran_before(c)) is not None:
            log.warning("site %r cameras %s: frames %d..%d were captured %.0f s ago on the site's previous clock (%s): "
                        "an edge that decided them within its --decided-ttl-s (1 h by default) takes these "
                        "observations as late and decides those frames not again; replay frames a site has decided "
                        "under a site id of their own (--site)", cfg.site, list(cfg.cameras), *ran,
                        time.time() - c.at(ran[0]), names.clock_topic(cfg.site))
        mine = SiteClock(cfg.site, time.time() + CLOCK_LEAD_S, cfg.fps, cfg.start, self.stop_at)
        self.signals.clock_seen.clear()
        self.clients[cfg.cameras[0]].publish(names.clock_topic(cfg.site), mine.encode(), qos=1, retain=True)
        self.signals.clock_seen.wait(CLOCK_WAIT_S)
        c = self.signals.clock
        return c if c is not None and c.fps == cfg.fps else mine

    def first_own_frame(self, clock: SiteClock) -> int:
        """The first frame of this camera's range that is its to send or shed. On a clock that was
        running when it joined, the frames due more than --max-lag-ms before that were not: another
        process of this camera sent them (one restarted) or none did (one started late), and the
        frames were decided with the cameras that came. They are skipped, not shed: naming them
        could contradict what a predecessor sent, and after hours of a running clock would be
        hundreds of thousands of notices. Frames that fall due from then on are this camera's."""
        cfg = self.cfg
        horizon = time.time() - cfg.max_lag_ms / 1000
        i = cfg.start
        if clock.at(i) >= horizon:
            return i
        i = max(cfg.start, min(self.stop_at, clock.due_by(horizon) - 1))
        while i < self.stop_at and clock.at(i) < horizon:
            i += 1
        log.info("site %r cameras %s: joining the site clock at frame %d: frames %d..%d were due before these cameras "
                 "started (sent by a process before this one, or by none: not theirs to send or shed)", cfg.site,
                 list(cfg.cameras), i, cfg.start, i - 1)
        return i

    def _ran_before(self, c: SiteClock) -> tuple[int, int] | None:
        """The first and last frame of this camera's range that the site's previous clock `c` (not
        joined) had captured already, or None: the same frame ids again, which an edge that
        decided them counts as late."""
        first, end = max(self.cfg.start, c.start), min(self.stop_at, c.stop, c.due_by(time.time()))
        return (first, end - 1) if first < end else None

    def shed(self, frame_ids: list[int], reason: str) -> None:
        """Skip frames, naming them (per camera, in ShedNotices the edge records as losses)."""
        if not frame_ids:
            return
        site = self.cfg.site
        self.stats.shed[reason] = self.stats.shed.get(reason, 0) + len(frame_ids)
        if self._shed_log():
            log.warning("site %r cameras %s: shedding frames (%s; now %d..%d, keeping %.0f%%); shed so far %s",
                        site, list(self.cfg.cameras), reason, frame_ids[0], frame_ids[-1], 100 * self.signals.keep,
                        self.stats.shed)
        for k, client in self.clients.items():
            for i in range(0, len(frame_ids), MAX_SHED_IDS):
                notice = ShedNotice(site, k, tuple(frame_ids[i:i + MAX_SHED_IDS]), reason, time.time())
                client.publish(names.shed_topic(site, k), notice.encode(), qos=1)

    def close(self, state: str | None = None) -> None:
        """Retain each camera's last status: "done", or "offline" when stopped before its last frame."""
        state = state or ("offline" if self.stopped_early else "done")
        for k, c in self.clients.items():
            c.publish(names.status_topic(self.cfg.site, k), CameraStatus(self.cfg.site, k, state, time.time()).encode(),
                      qos=1, retain=True)
            if not c.wait_confirmed(PUBLISH_TIMEOUT_S):
                self.stats.unacknowledged += c.unconfirmed
                log.warning("site %r camera %d: %d publishes not acknowledged by the broker after %.0f s",
                            self.cfg.site, k, c.unconfirmed, PUBLISH_TIMEOUT_S)
            if c.denied:
                self.stats.denied += c.denied
                log.error("site %r camera %d: the broker refused %d of its publishes (its ACL: is this the camera's "
                          "own login?); what they carried went nowhere", self.cfg.site, k, c.denied)
            c.close(timeout_s=0)
        self.clients.clear()

    @torch.no_grad()
    def observe(self, scenes: torch.Tensor, frame_ids: list[int], captured_at: list[float]) -> list[list[CameraObservation]]:
        """Observations of every camera of this process for a batch of scenes: [frame][camera]."""
        cfg = self.cfg
        out: list[list[CameraObservation]] = [[] for _ in frame_ids]
        labels = self.split.labels
        for k in cfg.cameras:
            views = normalize(camera_view(self.net, k, scenes))
            feats, logits = forward_rows(self.modules[k], views)
            feats = feats.float().cpu()
            if logits is not None:
                ent, pred = normalized_entropy(logits).cpu(), logits.argmax(-1).cpu()
            for i, f in enumerate(frame_ids):
                try:
                    out[i].append(CameraObservation(
                        cfg.site, f, k, captured_at[i],
                        None if logits is None else int(pred[i]), None if logits is None else float(ent[i]),
                        FeatureTensor.quantize(feats[i], self.wire_dtype),
                        int(labels[f]) if cfg.labels else None))
                except MessageError as err:
                    raise CameraError(cfg.site, f, f"cannot encode the observation: {err}", camera=k) from err
        return out

    def warm_up(self) -> None:
        """Run the cameras once on the first frame, publishing nothing, before joining the site
        clock: a network's first call sets up its kernels (`pipeline.layers.warm_up`), and on a
        clock the frames due meanwhile would be shed (at 10 fps, about one for every 0.1 s of it)."""
        t0 = time.perf_counter()
        self.observe(to_float(self.split.images[[self.cfg.start]], self.device), [self.cfg.start], [time.time()])
        log.info("site %r cameras %s: networks warmed up in %.2f s", self.cfg.site, list(self.cfg.cameras),
                 time.perf_counter() - t0)

    def encode(self, ids: list[int], captured_at: list[float]) -> list[list[tuple[int, bytes]]]:
        """The encoded observations of frames `ids`: [frame][(camera, bytes)]. Runs the camera
        modules (the load generator of `bench stream` replays pre-encoded ones instead). Lazy
        upload: the summaries, the features going to the cache (before any summary is sent, so a
        request always finds them)."""
        scenes = to_float(self.split.images[ids], self.device)
        frames = self.observe(scenes, ids, captured_at)
        if not self.lazy:
            return [[(o.camera, o.encode()) for o in frame] for frame in frames]
        cams = len(self.cfg.cameras)
        for frame in frames:
            for o in frame:
                self.cache.put(o.camera, o.frame_id, CameraFeatures(o.site, o.frame_id, o.camera, o.features).encode(),
                               cams)
        return [[(o.camera, summary_of(o).encode()) for o in frame] for frame in frames]

    def publish(self, obs: CameraObservation) -> None:
        self.publish_raw(obs.camera, obs.frame_id, obs.encode())

    def publish_raw(self, camera: int, frame_id: int, raw: bytes) -> None:
        """Queue one encoded observation (QoS 1). Through a broker outage paho keeps it and sends
        it on reconnect; only when MAX_QUEUED are already waiting is it dropped, named by frame id."""
        site = self.cfg.site
        if not self.clients[camera].publish(names.obs_topic(site, camera), raw, qos=1):
            self.stats.refused += 1
            self._refused.setdefault(camera, []).append(frame_id)  # named in a ShedNotice once there is room
            log.warning("site %r frame %d camera %d: dropped, %d observations already wait for the broker",
                        site, frame_id, camera, self.clients[camera].unconfirmed)
            return
        self.stats.published += 1
        self.stats.bytes += len(raw)

    def backlog(self) -> int:
        """Observations published and not yet acknowledged by the broker, over this process's cameras."""
        return sum(c.unconfirmed for c in self.clients.values())

    def capture(self, ids: list[int], captured_at: list[float]) -> None:
        """Run the cameras on frames `ids` (one batch) and publish, frame by frame, so that a
        frame's cameras arrive together."""
        if self.stats.first_capture is None:
            self.stats.first_capture = captured_at[0]
        for frame_id, frame in zip(ids, self.encode(ids, captured_at)):
            for camera, raw in frame:
                self.publish_raw(camera, frame_id, raw)
        self.stats.frames += len(ids)
        self._name_refused()

    def _name_refused(self) -> None:
        """Send the ShedNotices (reason "outage") of observations dropped while paho's queue was
        full, as soon as the broker takes messages again."""
        for camera, frame_ids in list(self._refused.items()):
            client, site = self.clients[camera], self.cfg.site
            while frame_ids:
                chunk = frame_ids[:MAX_SHED_IDS]
                notice = ShedNotice(site, camera, tuple(chunk), "outage", time.time())
                if not client.publish(names.shed_topic(site, camera), notice.encode(), qos=1):
                    return  # still no room: try after the next batch
                del frame_ids[:len(chunk)]
                self.stats.shed["outage"] = self.stats.shed.get("outage", 0) + len(chunk)
            del self._refused[camera]

    def run(self, stop: threading.Event | None = None) -> CameraStats:
        """Replay frames start..stop; returns when every frame is published or shed (or on `stop`)."""
        stop = stop or threading.Event()
        cfg = self.cfg
        if not self.clients:
            self.connect()
        t_start = time.time()
        log.info("site %r cameras %s: frames %d..%d at %s", cfg.site, list(cfg.cameras), cfg.start, self.stop_at,
                 f"{cfg.fps:g} fps" if cfg.fps else "full speed")
        self.warm_up()
        if self.lazy and cfg.feature_ttl_ms < EDGE_DEFAULT_WAIT_MS:
            log.warning("site %r cameras %s: --feature-ttl-ms %d is below the edge's default deadline and request "
                        "deadline (%d ms): features asked for later are gone, and those frames are decided without "
                        "them", cfg.site, list(cfg.cameras), cfg.feature_ttl_ms, EDGE_DEFAULT_WAIT_MS)
        if cfg.fps > 0:
            self._run_paced(stop)
        else:
            self._run_full_speed(stop)
        self.stopped_early = stop.is_set()  # the loops end early only on `stop`
        self.stats.seconds = time.time() - t_start
        self.stats.achieved_fps = self.stats.frames / max(1e-9, self.stats.seconds)
        self.linger(stop)
        log.info("site %r cameras %s: %s%d frames (%.1f fps), %d observations, %.0f bytes/observation, shed %s, "
                 "%.1fs", cfg.site, list(cfg.cameras),
                 f"stopped before the end of frames {cfg.start}..{self.stop_at}: " if self.stopped_early else "",
                 self.stats.frames, self.stats.achieved_fps, self.stats.published,
                 self.stats.bytes / max(1, self.stats.published), self.stats.shed or "none", self.stats.seconds)
        return self.stats

    def linger(self, stop: threading.Event) -> None:
        """Lazy upload: after the last frame, answer requests until none came for --linger-ms
        (at most --feature-ttl-ms, when nothing is kept any more), or until `release` is set (a
        replay that has every result)."""
        if not self.lazy:
            return
        quiet_s, end = self.cfg.linger_ms / 1000, time.monotonic() + self.cfg.feature_ttl_ms / 1000
        self._last_request = max(self._last_request, time.monotonic())
        while not stop.is_set() and not self.release.is_set() and time.monotonic() < end:
            left = self._last_request + quiet_s - time.monotonic()
            if left <= 0:
                break
            stop.wait(min(left, 0.05))
        log.info("site %r cameras %s: %d feature requests answered (%d bytes), %d misses, %d bad requests ignored",
                 self.cfg.site, list(self.cfg.cameras), self.stats.features_sent, self.stats.feature_bytes,
                 self.stats.request_misses, self.stats.bad_requests)

    def _run_full_speed(self, stop: threading.Event) -> None:
        cfg = self.cfg
        for begin in range(cfg.start, self.stop_at, cfg.batch):
            if stop.is_set():
                break
            ids = list(range(begin, min(self.stop_at, begin + cfg.batch)))
            if self.gate is not None:
                self.gate(begin - cfg.start)
            if cfg.overload == "wait":
                while self.overloaded() and not stop.is_set():
                    stop.wait(OVERLOAD_POLL_S)  # lossless: hold the frames until the edge catches up
            else:
                ids = self.admit(ids)
                if not ids:
                    stop.wait(OVERLOAD_POLL_S)  # give the edge a moment before looking again
                    continue
            self.capture(ids, [time.time()] * len(ids))
            while self.backlog() > MAX_BACKLOG and not stop.is_set():  # the broker is away or slow: let it catch up
                stop.wait(0.01)

    def _run_paced(self, stop: threading.Event) -> None:
        """At --fps on the site clock: capture the frames that are due in one batch, shed those
        too late to matter, report the achieved rate."""
        cfg = self.cfg
        clock = self.site_clock()
        i = self.first_own_frame(clock)
        if (wait_s := clock.at(i) - time.time()) > 1.0:
            log.info("site %r cameras %s: frame %d is due in %.1f s on the site clock (%.4g fps from frame %d); waiting",
                     cfg.site, list(cfg.cameras), i, wait_s, clock.fps, clock.start)
        report_at, report_frames = time.monotonic() + RATE_REPORT_S, 0
        while i < self.stop_at and not stop.is_set():
            now = time.time()
            if clock.at(i) > now:
                stop.wait(min(clock.at(i) - now, 0.25))
                continue
            due_end = min(self.stop_at, max(i + 1, clock.due_by(now)))
            if cfg.overload == "wait":
                while self.overloaded() and not stop.is_set():
                    stop.wait(OVERLOAD_POLL_S)  # lossless: fall behind, catch up in batches afterwards
            else:
                fresh = i
                while fresh < due_end and clock.at(fresh) < now - cfg.max_lag_ms / 1000:
                    fresh += 1
                self.shed(list(range(i, fresh)), "behind")
                i = fresh
                if i >= due_end:
                    continue
            due = list(range(i, min(due_end, i + cfg.batch)))
            i = due[-1] + 1
            ids = due if cfg.overload == "wait" else self.admit(due)
            if not ids:
                continue
            if self.gate is not None:
                self.gate(ids[0] - cfg.start)
            self.capture(ids, [clock.at(f) for f in ids])
            report_frames += len(due)
            if time.monotonic() >= report_at:
                rate = report_frames / RATE_REPORT_S
                behind = max(0, clock.due_by(time.time()) - i)
                level = logging.WARNING if rate < 0.95 * cfg.fps or behind > cfg.fps else logging.INFO
                log.log(level, "site %r cameras %s: %.1f fps of %.1f asked, %d frames behind, shed so far %s",
                        cfg.site, list(cfg.cameras), rate, cfg.fps, behind, self.stats.shed or "none")
                report_at, report_frames = time.monotonic() + RATE_REPORT_S, 0


def resolve_upload(upload: str, has_camera_classifiers: bool, site: str = "") -> str:
    """"lazy" or "eager" for an `--upload` choice and a network: auto is lazy exactly when the
    cameras have classifiers (ADA-DDNN); lazy without them is an error (nothing to decide exit 1
    from)."""
    if upload == "auto":
        return "lazy" if has_camera_classifiers else "eager"
    if upload == "lazy" and not has_camera_classifiers:
        raise CameraError(site, None, "lazy upload needs camera classifiers (an ADA-DDNN checkpoint): a DDNN camera "
                          "has no prediction to send in place of its features; use --upload eager")
    return upload


def load_feed(cfg: CameraConfig, gate: Callable[[int], None] | None = None) -> CameraFeed:
    """The split and the cameras' parts of the checkpoint the config names, as a ready
    (unconnected) feed. Only the cameras' own tensors are read."""
    net = read_config(cfg.checkpoint)
    for k in cfg.cameras:
        if not 0 <= k < net.num_cameras:
            raise CameraError(cfg.site, None, f"no such camera (the network has {net.num_cameras})", camera=k)
    modules = {k: load_camera(cfg.checkpoint, k) for k in cfg.cameras}
    data = load_cifar10(cfg.data)
    return CameraFeed(cfg, modules, data.split(cfg.split), gate)


# --- CLI ----------------------------------------------------------------------------------

def check_online(cfg: CameraConfig, timeout_s: float = 5.0) -> int:
    """0 when every camera of `cfg` has a retained "online" status, else 1."""
    states: dict[int, str] = {}
    got = threading.Event()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        try:
            st = CameraStatus.decode(msg.payload)
        except MessageError as err:
            log.warning("bad status on %s: %s", msg.topic, err)
            return
        states[st.camera] = st.state
        if all(k in states for k in cfg.cameras):
            got.set()

    try:
        client = mqtt_client(cfg.mqtt_url, f"{cfg.site}-check-{time.monotonic_ns():x}",
                             on_connect=lambda c: c.subscribe(names.status_filter(cfg.site), qos=1),
                             on_message=on_message, timeout_s=timeout_s)
    except ConnectError as err:
        log.error("%s", err)
        return 1
    got.wait(timeout_s)  # retained messages arrive right after the subscription, if any
    close_mqtt(client)
    down = [k for k in cfg.cameras if states.get(k) != "online"]
    for k in cfg.cameras:
        log.info("site %r camera %d: %s", cfg.site, k, states.get(k, "unknown"))
    return 1 if down else 0


def main(args: argparse.Namespace) -> int:
    overrides = {"cameras": (args.cam,)} if getattr(args, "cam", None) is not None else {}
    cfg = config_from_args(CameraConfig, args, **overrides)
    if printed(cfg, args):
        return 0
    if args.check:
        return check_online(cfg)
    if cfg.fps == 0 and len(cfg.cameras) < 6:
        log.warning("site %r cameras %s: --fps 0 runs as fast as possible, on no site clock: cameras started as "
                    "separate processes will not capture the same frames at the same time, and the edge decides "
                    "most frames without some of them; give every camera of the site the same --fps",
                    cfg.site, list(cfg.cameras))
    set_threads(cfg.threads)
    stats = serve(load_feed(cfg))
    return 0 if stats.unacknowledged == 0 and stats.denied == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `camera` (one camera) and `cameras` (several in one process) to the `ada-ddnn` parser."""
    check = "exit 0 if the camera(s) are online (retained status), else 1"
    p = add_command(subparsers, "camera", CameraConfig, main, help="one camera: replay frames, run its module, publish "
                    "observations", description=__doc__, check=check, exclude=("cameras",))
    p.add_argument("--cam", type=int, required=True, help="camera id (0..5)")
    add_command(subparsers, "cameras", CameraConfig, main, help="several cameras in one process (default all six), "
                "each with its own MQTT client", description=__doc__, check=check,
                defaults={"cameras": tuple(range(6))})
