"""The edge aggregator: assembles each frame's camera observations in Redis and decides it.

    ada-ddnn edge --checkpoint models/ada.safetensors --deadline-ms 50
    ada-ddnn edge --check                        # 0 if an aggregator of the site is alive

Several aggregators split the load through an MQTT v5 shared subscription
(`$share/edge/ada/{site}/cam/+/obs`). Each observation is validated and added to its frame in
Redis (`edge.frame_store`: assembly, deadline claims, leases, exactly-once results). For the
frames it claims, an aggregator applies exit 1 (the most confident camera, ADA-DDNN only), else
fuses the camera features and runs the edge block (exit 2), else escalates the fused features
to `ada:{site}:escalations` for the cloud. Decisions go to `ada:{site}:results` and
`ada/{site}/results`. It loads only the edge's part of the checkpoint.

Messages that fail validation go to `ada:{site}:deadletter` with the reason; so do frames whose
decision fails, and their leases are released.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import torch

from edge.edge_net import EdgeModule, load_edge
from edge.exits import EXIT1, EXIT2, decide
from edge.frame_store import FrameStore, StoreTimes
from edge.fusion import fuse
from pipeline.checkpoint import thresholds
from pipeline.compute import resolve_device, set_threads
from pipeline.entropy import normalized_entropy
from pipeline.errors import AggregationError, EscalationError, MessageError
from pipeline.layers import forward_rows
from pipeline.settings import add_command, config_from_args, printed
from pipeline.transport.mqtt_client import mqtt_client
from pipeline.transport.redis_client import Heartbeat, check_alive, redis_client
from pipeline.transport.results_sink import PUBLISH_TIMEOUT_S, add_dead_letter
from pipeline.transport.service import BrokerRoleConfig, BrokerService, serve, service_id
from pipeline.wire import names
from pipeline.wire.messages import DTYPES, EXIT_NAMES, CameraObservation, Decision, Escalation, FeatureTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig(BrokerRoleConfig):
    """One edge aggregator (site, brokers and checkpoint as in `BrokerRoleConfig`)."""

    t1: float | None = None  # exit 1 threshold (normalized entropy); none = the model card's
    t2: float | None = None  # exit 2 threshold (normalized entropy); none = the model card's
    expected: int = 0  # cameras per frame; 0 = the network's num_cameras
    deadline_ms: int = 50  # after a frame's first observation, decide it this long (ms) later with the cameras that came
    scan_ms: int = 5  # how often (ms) to look for frames past their deadline
    frame_ttl_s: int = 60  # an unclaimed frame hash expires after this (s; every aggregator dead)
    decided_ttl_s: int = 3600  # how long (s) a decided frame refuses late observations (and markers live)
    claim_lease_ms: int = 10_000  # a claimed frame not decided within this (ms) is taken over by another aggregator
    escalation_maxlen: int = 10_000  # escalations waiting for the cloud; beyond, the edge waits
    results_maxlen: int = 1_000_000  # results kept in the results stream (approximate trim)
    escalation_dtype: str = field(default="same", metadata={"choices": ("same", *DTYPES)})  # dtype of escalated features; same = the cameras'
    queue_size: int = 2048  # observations buffered between the MQTT thread and the decision loop
    claim_batch: int = 64  # frames claimed per deadline scan at most
    device: str = "cpu"  # cpu, cuda or auto, for the edge block
    threads: int = 0  # torch CPU threads; 0 = torch's default
    service_id: str = ""  # this aggregator's id; "" = generated
    share_group: str = names.SHARE_GROUP  # MQTT v5 shared-subscription group the aggregators share

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.escalation_dtype != "same" and self.escalation_dtype not in DTYPES:
            raise ValueError(f"escalation_dtype must be 'same' or one of {tuple(DTYPES)}")
        if self.deadline_ms < 1 or self.scan_ms < 1 or self.escalation_maxlen < 1 or self.claim_lease_ms < 1:
            raise ValueError("deadline_ms, scan_ms, escalation_maxlen and claim_lease_ms must be positive")

    def store_times(self, expected: int) -> StoreTimes:
        return StoreTimes(expected, self.deadline_ms, self.frame_ttl_s * 1000, self.decided_ttl_s * 1000,
                          self.claim_lease_ms, self.claim_batch, self.escalation_maxlen, self.results_maxlen)


@dataclass
class Frame:
    """A claimed frame: its observations, sorted by camera."""

    frame_id: int
    observations: list[CameraObservation]
    reclaimed: bool = False  # taken over from an owner whose lease expired

    @property
    def present(self) -> tuple[int, ...]:
        return tuple(o.camera for o in self.observations)

    @property
    def captured_at(self) -> float:
        return min(o.captured_at for o in self.observations)

    @property
    def label(self) -> int | None:
        return next((o.label for o in self.observations if o.label is not None), None)


@torch.no_grad()
def decide_frames(edge: EdgeModule, frames: list[Frame], t1: float | None, t2: float,
                  device: torch.device = torch.device("cpu")) -> tuple[list[tuple[str, int, float, int | None]],
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit 1, then fusion + edge + exit 2, for claimed frames; pure (no I/O).

    Returns ([(exit name, prediction, entropy, camera or None)], fused, edge entropy, edge
    prediction); the caller escalates the frames whose exit is "cloud". Numbers match offline
    evaluation: same camera order, same fusion, batches never of one row."""
    cfg = edge.cfg
    n, cams = len(frames), cfg.num_cameras
    features = torch.zeros(n, cams, *cfg.wire_shape)
    present = torch.zeros(n, cams, dtype=torch.bool)
    cam_entropy = torch.ones(n, cams)
    cam_pred = torch.zeros(n, cams, dtype=torch.long)
    for i, fr in enumerate(frames):
        for o in fr.observations:
            features[i, o.camera] = o.features.to_tensor()
            present[i, o.camera] = True
            if o.entropy is not None:
                cam_entropy[i, o.camera] = o.entropy
                cam_pred[i, o.camera] = o.prediction  # type: ignore[assignment]
    fused = fuse(features, present, cfg.fusion)
    edge_logits = forward_rows(edge, fused.to(device)).float().cpu()
    edge_entropy, edge_pred = normalized_entropy(edge_logits), edge_logits.argmax(-1)
    has_cams = cfg.has_camera_classifiers
    d = decide(t1 if has_cams else None, t2, edge_entropy, edge_pred, torch.zeros(n, dtype=torch.long),
               cam_entropy if has_cams else None, cam_pred if has_cams else None, present)
    out = []
    for i in range(n):
        e = int(d.exit[i])
        if e == EXIT1:
            cam = int(d.camera[i])
            out.append(("exit1", int(d.prediction[i]), float(cam_entropy[i, cam]), cam))
        elif e == EXIT2:
            out.append(("exit2", int(d.prediction[i]), float(edge_entropy[i]), None))
        else:
            out.append(("cloud", -1, float(edge_entropy[i]), None))
    return out, fused, edge_entropy, edge_pred


@dataclass
class EdgeStats:
    observations: int = 0
    claimed: int = 0
    decided: dict[str, int] = field(default_factory=lambda: {name: 0 for name in EXIT_NAMES})
    late: int = 0
    duplicates: int = 0
    reclaimed: int = 0  # frames taken over from an owner whose lease expired
    escalation_conflicts: int = 0  # escalations refused: the frame was already escalated or decided
    deadletter: int = 0
    backpressure_waits: int = 0
    escalated_bytes: int = 0  # encoded Escalation bytes sent to the cloud


class Aggregator(BrokerService):
    """One edge aggregator; `run(stop)` until the event is set (or use start/stop for a thread)."""

    role = "edge"

    def __init__(self, cfg: EdgeConfig, edge: EdgeModule, t1: float | None, t2: float) -> None:
        super().__init__(cfg.service_id or service_id("edge"))
        self.device = resolve_device(cfg.device)
        self.cfg, self.edge, self.t1, self.t2 = cfg, edge.to(self.device).eval(), t1, t2
        self.net = edge.cfg  # the network's ModelConfig: cameras, wire shape, mode
        self.expected = cfg.expected or self.net.num_cameras
        self.stats = EdgeStats()
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=cfg.queue_size)
        self.store: FrameStore | None = None

    # -- wiring --
    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        self.store = FrameStore(self.redis, cfg.site, self.sid, cfg.store_times(self.expected))
        self.heartbeat = Heartbeat(self.redis, cfg.site, "edge", self.sid, cfg.heartbeat_s, self._beat_info).start()
        sub = names.shared_obs_filter(cfg.site, cfg.share_group)

        def on_connect(c: mqtt.Client) -> None:
            c.subscribe(sub, qos=1)

        self.mqtt = mqtt_client(cfg.mqtt_url, self.sid, on_connect=on_connect, on_message=self.inbox.put)
        log.info("edge %s: site %r, subscribed %s, t1=%s t2=%s, deadline %d ms, %d cameras expected", self.sid,
                 cfg.site, sub, self.t1, self.t2, cfg.deadline_ms, self.expected)

    def _beat_info(self) -> dict:
        return {"observations": self.stats.observations, "decided": dict(self.stats.decided), "late": self.stats.late,
                "reclaimed": self.stats.reclaimed}

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        cfg = self.cfg
        scan_s = cfg.scan_ms / 1000.0
        next_scan = time.monotonic()
        while not stop.is_set():
            timeout = max(0.0, next_scan - time.monotonic())
            claimed: list[Frame] = []
            try:
                msg = self.inbox.get(timeout=timeout)
                claimed.extend(self.handle(msg))
                while len(claimed) < cfg.claim_batch:  # drain what is already queued, decide in one batch
                    claimed.extend(self.handle(self.inbox.get_nowait()))
            except queue.Empty:
                pass
            if time.monotonic() >= next_scan:
                claimed.extend(self.claim_expired())
                next_scan = time.monotonic() + scan_s
            if claimed:
                self.decide_and_send(claimed, stop)

    def handle(self, msg: mqtt.MQTTMessage) -> list[Frame]:
        """One observation off the wire: validate, add to its frame; the frame if this claimed it."""
        self.stats.observations += 1
        try:
            obs = CameraObservation.decode(msg.payload)
            self._validate(obs, msg.topic)
        except (MessageError, AggregationError) as err:
            self.dead_letter(msg.topic, msg.payload, str(err))
            return []
        assert self.store is not None
        status, payloads = self.store.add(obs, bytes(msg.payload))
        if status == "late":
            self.stats.late += 1
            log.debug("site %r frame %d camera %d: late observation dropped", self.cfg.site, obs.frame_id, obs.camera)
        elif status == "duplicate":
            self.stats.duplicates += 1
        elif status == "claimed":
            return [self._frame(obs.frame_id, payloads)]
        return []

    def _validate(self, obs: CameraObservation, topic: str) -> None:
        cfg, net = self.cfg, self.net
        if obs.site != cfg.site or topic != names.obs_topic(obs.site, obs.camera):
            raise AggregationError(cfg.site, obs.frame_id, f"observation of site {obs.site!r} on topic {topic}",
                                   camera=obs.camera)
        if obs.camera >= net.num_cameras:
            raise AggregationError(cfg.site, obs.frame_id, "camera id beyond the network's cameras", camera=obs.camera)
        if obs.features.shape != net.wire_shape:
            raise AggregationError(cfg.site, obs.frame_id, f"features {obs.features.shape}, expected {net.wire_shape}",
                                   camera=obs.camera)
        if (obs.entropy is None) == net.has_camera_classifiers:
            raise AggregationError(cfg.site, obs.frame_id, f"camera prediction does not fit mode {net.mode!r}",
                                   camera=obs.camera)

    def _frame(self, frame_id: int, payloads: list[bytes], reclaimed: bool = False) -> Frame:
        obs = sorted((CameraObservation.decode(p) for p in payloads), key=lambda o: o.camera)
        self.stats.claimed += 1
        return Frame(int(frame_id), obs, reclaimed)

    def claim_expired(self) -> list[Frame]:
        """Claim the frames past their deadline, and take over the claims whose lease expired."""
        assert self.store is not None
        site, cfg = self.cfg.site, self.cfg
        frames, owners = [], []
        for frame_id, payloads, kind, prev in self.store.claim_expired():
            if kind == "lost":
                log.error("edge %s: site %r frame %d: its claim expired with its observations (no aggregator for "
                          "%d s); the frame has no result", self.sid, site, frame_id, cfg.decided_ttl_s)
                continue
            if kind == "reclaimed":
                owners.append(prev or "?")
                log.debug("edge %s: site %r frame %d: lease of %s expired, re-claimed", self.sid, site, frame_id, prev)
            frames.append(self._frame(frame_id, payloads, reclaimed=kind == "reclaimed"))
        if owners:
            self.stats.reclaimed += len(owners)
            log.warning("edge %s: site %r: re-claimed %d frames whose lease (%d ms) expired, claimed by %s", self.sid,
                        site, len(owners), cfg.claim_lease_ms, ", ".join(sorted(set(owners))))
        return frames

    def dead_letter(self, source: str, payload: bytes, reason: str) -> None:
        self.stats.deadletter += 1
        log.warning("site %r: dead letter from %s: %s", self.cfg.site, source, reason)
        assert self.redis is not None
        add_dead_letter(self.redis, self.cfg.site, source, payload, reason, self.sid)

    def decide_and_send(self, frames: list[Frame], stop: threading.Event) -> None:
        assert self.store is not None
        try:
            outcomes, fused, edge_entropy, edge_pred = decide_frames(self.edge, frames, self.t1, self.t2, self.device)
        except (RuntimeError, ValueError) as err:  # per-message boundary: the frames go to the dead letters
            for fr in frames:
                self.dead_letter(f"frame {fr.frame_id}", b"", f"decision failed: {err}")
            self.store.release([fr.frame_id for fr in frames])
            return
        infos = []
        for i, (fr, (exit_name, pred, entropy, cam)) in enumerate(zip(frames, outcomes)):
            if exit_name == "cloud":
                self.escalate(fr, fused[i], float(edge_entropy[i]), int(edge_pred[i]), stop)
                continue
            dec = Decision(self.cfg.site, fr.frame_id, exit_name, pred, entropy, cam, fr.present, fr.captured_at,
                           time.time(), self.sid, fr.label)
            info = self.store.record(dec, self.mqtt)
            if info is not None:
                infos.append(info)
            self.stats.decided[exit_name] += 1
        for info in infos:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)

    def escalate(self, fr: Frame, fused: torch.Tensor, edge_entropy: float, edge_pred: int,
                 stop: threading.Event) -> None:
        assert self.store is not None
        site = self.cfg.site
        dtype = fr.observations[0].features.dtype if self.cfg.escalation_dtype == "same" else self.cfg.escalation_dtype
        esc = Escalation(site, fr.frame_id, fr.present, fr.captured_at, FeatureTensor.quantize(fused, dtype),
                         edge_entropy, edge_pred, fr.label)
        raw = esc.encode()
        delay = 0.005
        while (added := self.store.escalate(fr.frame_id, raw)) == 0:  # full: the lease is extended
            self.stats.backpressure_waits += 1
            if self.stats.backpressure_waits % 100 == 1:
                log.warning("site %r frame %d: escalation stream full (%d entries); waiting for the cloud", site,
                            fr.frame_id, self.cfg.escalation_maxlen)
            if stop.wait(delay):
                raise EscalationError(site, fr.frame_id, "stopped while the escalation stream was full")
            delay = min(1.0, delay * 2)  # capped backoff while the cloud catches up
        if added < 0:
            self.stats.escalation_conflicts += 1
            log.info("site %r frame %d: already escalated or decided (lease taken over); not escalated twice", site,
                     fr.frame_id)
            self.store.count("escalation_conflicts")
            return
        self.stats.decided["cloud"] += 1
        self.stats.escalated_bytes += len(raw)


# --- CLI ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(EdgeConfig, args)
    if printed(cfg, args):
        return 0
    if args.check:
        return check_alive(cfg.redis_url, cfg.site, "edge", cfg.service_id or None)
    set_threads(cfg.threads)
    edge = load_edge(cfg.checkpoint)
    t1, t2 = thresholds(cfg.checkpoint, edge.cfg, cfg.t1, cfg.t2)
    serve(Aggregator(cfg, edge, t1, t2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `edge` to the `ada-ddnn` parser."""
    add_command(subparsers, "edge", EdgeConfig, main, help="edge aggregator: assemble frames, exits 1 and 2, escalate "
                "the rest", description=__doc__, check="exit 0 if an aggregator of the site is alive, else 1")
