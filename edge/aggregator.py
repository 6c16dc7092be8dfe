"""The edge aggregator: assembles each frame's camera observations in Redis and decides it.

    ada-ddnn edge --checkpoint models/ada.safetensors --deadline-ms 50
    ada-ddnn edge --check                        # 0 if an aggregator of the site is alive

Several aggregators split the load through an MQTT v5 shared subscription
(`$share/edge/ada/{site}/cam/+/obs`). For every observation:

1. `ADD_OBSERVATION` (one Lua script, so atomic) stores it in the frame's hash
   `ada:{site}:frame:{id}` (TTL); a duplicate delivery (QoS 1) and an observation for a frame
   already claimed are dropped and counted. The first observation puts the frame in the pending
   set with a deadline (Redis clock + --deadline-ms). The observation that completes the frame
   claims it in the same script.
2. Every few ms each aggregator runs `CLAIM_EXPIRED`, which claims frames whose deadline has
   passed with the cameras they have: a dead camera does not stall its frames. A claim sets
   `ada:{site}:decided:{id}` with SET NX, so exactly one aggregator gets each frame.
3. A claim is a lease, so that an aggregator that dies holding frames loses none of them. The
   claim renames the frame hash to `ada:{site}:claimed:{id}` (the observations stay in Redis)
   and adds the frame to the sorted set `ada:{site}:claimed`, scored by Redis TIME +
   --claim-lease-ms. The same `CLAIM_EXPIRED` scan takes over every lease that has expired (the
   owner died or is stalled): it renews the lease in its own name, re-reads the observations,
   counts `reclaimed` in `ada:{site}:counters` and decides the frame again.
4. The claimer applies exit 1 (the most confident camera), else fusion + edge block + exit 2,
   else escalates the fused features to `ada:{site}:escalations` (`ESCALATE` refuses to add
   beyond --escalation-maxlen: the edge waits, renewing its lease, and nothing is trimmed).
   Decisions are recorded in `ada:{site}:results` once (`RECORD_RESULT` sets the marker
   `ada:{site}:result:{id}` with NX) and published on `ada/{site}/results`; an escalation is
   added once (`ESCALATE` sets `ada:{site}:escalated:{id}` with NX and refuses a frame that
   already has a result, and `RECORD_RESULT` refuses a frame already escalated). Either script
   releases the lease (ZREM + DEL of the claimed hash) in the same step. So a slow owner that
   finishes after its lease was taken over changes nothing: the frame still gets exactly one
   result (its second attempt is counted in `result_conflicts` or `escalation_conflicts`).

Messages that fail validation go to `ada:{site}:deadletter` with the reason; so do frames whose
decision fails, and their leases are released. Lua scripts build per-frame keys from the site's
prefix and RENAME between keys: this needs one Redis, not a cluster.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import paho.mqtt.client as mqtt
import torch

from edge.exits import EXIT1, EXIT2, EXIT_NAMES, decide
from edge.fusion import fuse
from pipeline import topics
from pipeline.config import env_default
from pipeline.entropy import normalized_entropy
from pipeline.errors import AggregationError, EscalationError
from pipeline.messages import DTYPES, CameraObservation, Decision, Escalation, FeatureTensor, MessageError
from pipeline.network import AdaDDNN, forward_rows
from pipeline.results_sink import PUBLISH_TIMEOUT_S, RECORD_RESULT, add_dead_letter, record_and_publish
from pipeline.runtime import (BrokerService, Heartbeat, add_broker_args, check_alive, config_from_env,
                              mqtt_client, redis_client, resolve_device, service_id, serve, set_threads)

log = logging.getLogger(__name__)

# A claim is a lease. The claimer renames the frame hash to `claimed:{id}` (the observations
# stay in Redis) and adds the frame to the `claimed` sorted set scored by Redis TIME + lease.
# Recording the result (RECORD_RESULT with the lease keys) or escalating it (ESCALATE) removes
# both in the same script. A lease still there when it expires belongs to a dead (or slow)
# owner: CLAIM_EXPIRED takes it over. Keys are built from prefixes inside the scripts, and RENAME
# moves a key: this needs one Redis, not a cluster.

# KEYS: frame hash, decided marker, pending zset, counters, claimed zset, claimed frame hash
# ARGV: camera field, payload, expected cameras, deadline ms, frame ttl ms, frame id, owner, decided ttl ms,
#       lease ms
ADD_OBSERVATION = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[4], 'late', 1)
  return {'late'}
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  redis.call('HINCRBY', KEYS[4], 'duplicate_observations', 1)
  return {'duplicate'}
end
local n = redis.call('HLEN', KEYS[1])
local complete = n >= tonumber(ARGV[3])
if n > 1 and not complete then
  return {'added'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not complete then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {'added'}
end
redis.call('SET', KEYS[2], ARGV[7], 'PX', ARGV[8])
redis.call('RENAME', KEYS[1], KEYS[6])
redis.call('PEXPIRE', KEYS[6], ARGV[8])
redis.call('ZREM', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[9]), ARGV[6])
return {'claimed', redis.call('HVALS', KEYS[6])}
"""

# KEYS: pending zset, claimed zset, counters
# ARGV: key prefixes of frame hash, decided marker, claimed frame hash, result marker, escalated marker
#       (each "ada:{site}:<name>:", the frame id is appended), max frames, owner, decided ttl ms, lease ms
# Returns flat (frame id, observations, kind, previous owner) quadruples; kind is 'claimed' (past
# its deadline), 'reclaimed' (its lease expired) or 'lost' (its observations expired with it).
CLAIM_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[9])
local limit = tonumber(ARGV[6])
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local fk = ARGV[1] .. id
  if redis.call('SET', ARGV[2] .. id, ARGV[7], 'NX', 'PX', ARGV[8]) and redis.call('EXISTS', fk) == 1 then
    local ck = ARGV[3] .. id
    redis.call('RENAME', fk, ck)
    redis.call('PEXPIRE', ck, ARGV[8])
    redis.call('ZADD', KEYS[2], lease_until, id)
    table.insert(out, id)
    table.insert(out, redis.call('HVALS', ck))
    table.insert(out, 'claimed')
    table.insert(out, '')
  end
end
ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  local ck = ARGV[3] .. id
  if redis.call('EXISTS', ARGV[4] .. id) == 1 or redis.call('EXISTS', ARGV[5] .. id) == 1 then
    redis.call('ZREM', KEYS[2], id)
    redis.call('DEL', ck)
  elseif redis.call('EXISTS', ck) == 0 then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HINCRBY', KEYS[3], 'claims_lost', 1)
    table.insert(out, id)
    table.insert(out, {})
    table.insert(out, 'lost')
    table.insert(out, '')
  else
    local prev = redis.call('GET', ARGV[2] .. id) or ''
    redis.call('SET', ARGV[2] .. id, ARGV[7], 'XX', 'KEEPTTL')
    redis.call('ZADD', KEYS[2], lease_until, id)
    redis.call('PEXPIRE', ck, ARGV[8])
    redis.call('HINCRBY', KEYS[3], 'reclaimed', 1)
    table.insert(out, id)
    table.insert(out, redis.call('HVALS', ck))
    table.insert(out, 'reclaimed')
    table.insert(out, prev)
  end
end
return out
"""

# KEYS: escalation stream, escalated marker, result marker, claimed zset, claimed frame hash
# ARGV: maxlen, frame id, payload, owner, marker ttl ms, lease ms
# 1 = added (lease released); 0 = the stream is full: the caller waits, its lease is extended;
# -1 = the frame was already escalated or has a result (a slow owner after a take-over): lease released.
ESCALATE = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[5])
  return -1
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[4], 'XX', now + tonumber(ARGV[6]), ARGV[2])
  return 0
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'frame', ARGV[2], 'msg', ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[5])
return 1
"""


@dataclass(frozen=True)
class EdgeConfig:
    """One edge aggregator."""

    site: str = "site0"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint: str = "models/ada.safetensors"
    t1: float | None = None  # exit 1 threshold; None = the model card's
    t2: float | None = None  # exit 2 threshold; None = the model card's
    expected: int = 0  # cameras per frame; 0 = the network's num_cameras
    deadline_ms: int = 50  # after a frame's first observation, decide with the cameras that came
    scan_ms: int = 5  # how often to look for frames past their deadline
    frame_ttl_s: int = 60  # an unclaimed frame hash expires after this (all aggregators dead)
    decided_ttl_s: int = 3600  # how long a decided frame refuses late observations (and claims, markers live)
    claim_lease_ms: int = 10_000  # a claimed frame not decided within this is taken over by another aggregator
    escalation_maxlen: int = 10_000  # escalations waiting for the cloud; beyond, the edge waits
    results_maxlen: int = 1_000_000  # results kept in the results stream (approximate trim)
    escalation_dtype: str = "same"  # dtype of escalated features; "same" = the cameras' dtype
    queue_size: int = 2048  # observations buffered between the MQTT thread and the worker
    claim_batch: int = 64  # frames claimed per deadline scan
    device: str = "cpu"
    service_id: str = ""  # "" = generated
    heartbeat_s: float = 2.0
    share_group: str = topics.SHARE_GROUP

    def __post_init__(self) -> None:
        topics.check_site(self.site)
        if self.escalation_dtype != "same" and self.escalation_dtype not in DTYPES:
            raise ValueError(f"escalation_dtype must be 'same' or one of {tuple(DTYPES)}")
        if self.deadline_ms < 1 or self.scan_ms < 1 or self.escalation_maxlen < 1 or self.claim_lease_ms < 1:
            raise ValueError("deadline_ms, scan_ms, escalation_maxlen and claim_lease_ms must be positive")

    @classmethod
    def from_env(cls, **overrides) -> "EdgeConfig":
        return config_from_env(cls, **overrides)


def thresholds_from_card(checkpoint: str, t1: float | None, t2: float | None, mode: str) -> tuple[float | None, float]:
    """(T1, T2): the given values, else the model card's; T1 is None for DDNN (no exit 1)."""
    if t1 is None or t2 is None:
        from pipeline.checkpoint import load_card

        card = load_card(checkpoint).get("thresholds") or {}
        t1 = card.get("t1") if t1 is None else t1
        t2 = card.get("t2") if t2 is None else t2
    if t2 is None:
        raise ValueError(f"{checkpoint}: no thresholds in its model card; pass --t1/--t2")
    return (None if mode != "ada" else (0.0 if t1 is None else float(t1))), float(t2)


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
def decide_frames(model: AdaDDNN, frames: list[Frame], t1: float | None, t2: float,
                  device: torch.device = torch.device("cpu")) -> tuple[list[tuple[str, int, float, int | None]],
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit 1, then fusion + edge + exit 2, for claimed frames; pure (no I/O).

    Returns ([(exit name, prediction, entropy, camera or None)], fused, edge entropy, edge
    prediction); the caller escalates the frames whose exit is "cloud". Numbers match offline
    evaluation: same camera order, same fusion, batches never of one row."""
    cfg = model.cfg
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
    edge_logits = forward_rows(model.edge, fused.to(device)).float().cpu()
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

    def __init__(self, cfg: EdgeConfig, model: AdaDDNN, t1: float | None, t2: float) -> None:
        super().__init__(cfg.service_id or service_id("edge"))
        self.cfg, self.model, self.t1, self.t2 = cfg, model.eval(), t1, t2
        self.device = resolve_device(cfg.device)
        self.model.to(self.device)
        self.expected = cfg.expected or model.cfg.num_cameras
        self.stats = EdgeStats()
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=cfg.queue_size)
        # key prefixes the Lua scripts append a frame id to ("ada:{site}:frame:", ...)
        self._key_prefixes = [_prefix(fn, cfg.site) for fn in (topics.frame_key, topics.decided_key,
                                                             topics.claimed_frame_key, topics.result_key,
                                                             topics.escalated_key)]
        self._scripts: dict[str, Any] = {}
        self._ready = threading.Event()

    # -- wiring --
    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        for name, src in (("add", ADD_OBSERVATION), ("expired", CLAIM_EXPIRED), ("record", RECORD_RESULT),
                          ("escalate", ESCALATE)):
            self._scripts[name] = self.redis.register_script(src)
        self.heartbeat = Heartbeat(self.redis, cfg.site, "edge", self.sid, cfg.heartbeat_s, self._beat_info).start()
        sub = topics.shared_obs_filter(cfg.site, cfg.share_group)

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
        site = self.cfg.site
        res = self._scripts["add"](
            keys=[topics.frame_key(site, obs.frame_id), topics.decided_key(site, obs.frame_id),
                  topics.pending_key(site), topics.counters_key(site), topics.claimed_key(site),
                  topics.claimed_frame_key(site, obs.frame_id)],
            args=[obs.camera, bytes(msg.payload), self.expected, self.cfg.deadline_ms, self.cfg.frame_ttl_s * 1000,
                  obs.frame_id, self.sid, self.cfg.decided_ttl_s * 1000, self.cfg.claim_lease_ms])
        status = res[0].decode()
        if status == "late":
            self.stats.late += 1
            log.debug("site %r frame %d camera %d: late observation dropped", site, obs.frame_id, obs.camera)
        elif status == "duplicate":
            self.stats.duplicates += 1
        elif status == "claimed":
            return [self._frame(obs.frame_id, res[1])]
        return []

    def _validate(self, obs: CameraObservation, topic: str) -> None:
        cfg, mcfg = self.cfg, self.model.cfg
        if obs.site != cfg.site or topic != topics.obs_topic(obs.site, obs.camera):
            raise AggregationError(cfg.site, obs.frame_id, f"observation of site {obs.site!r} on topic {topic}",
                                   camera=obs.camera)
        if obs.camera >= mcfg.num_cameras:
            raise AggregationError(cfg.site, obs.frame_id, "camera id beyond the network's cameras", camera=obs.camera)
        if obs.features.shape != mcfg.wire_shape:
            raise AggregationError(cfg.site, obs.frame_id, f"features {obs.features.shape}, expected {mcfg.wire_shape}",
                                   camera=obs.camera)
        if (obs.entropy is None) == mcfg.has_camera_classifiers:
            raise AggregationError(cfg.site, obs.frame_id, f"camera prediction does not fit mode {mcfg.mode!r}",
                                   camera=obs.camera)

    def _frame(self, frame_id: int, payloads: list[bytes], reclaimed: bool = False) -> Frame:
        obs = sorted((CameraObservation.decode(p) for p in payloads), key=lambda o: o.camera)
        self.stats.claimed += 1
        return Frame(int(frame_id), obs, reclaimed)

    def claim_expired(self) -> list[Frame]:
        """Claim the frames past their deadline, and take over the claims whose lease expired."""
        site, cfg = self.cfg.site, self.cfg
        res = self._scripts["expired"](keys=[topics.pending_key(site), topics.claimed_key(site),
                                             topics.counters_key(site)],
                                       args=[*self._key_prefixes, cfg.claim_batch, self.sid, cfg.decided_ttl_s * 1000,
                                             cfg.claim_lease_ms])
        frames, owners = [], []
        for i in range(0, len(res), 4):
            frame_id, payloads, kind, prev = int(res[i]), res[i + 1], res[i + 2].decode(), res[i + 3].decode()
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

    def _lease_keys(self, frame_id: int) -> tuple[str, str, str]:
        """The keys `RECORD_RESULT` needs to release a frame's claim lease."""
        site = self.cfg.site
        return topics.claimed_key(site), topics.claimed_frame_key(site, frame_id), topics.escalated_key(site, frame_id)

    def release(self, frames: list[Frame]) -> None:
        """Drop the claim leases of frames that reached an end other than a result (the dead letters)."""
        assert self.redis is not None
        site = self.cfg.site
        with self.redis.pipeline(transaction=True) as p:
            for fr in frames:
                p.zrem(topics.claimed_key(site), fr.frame_id)
                p.delete(topics.claimed_frame_key(site, fr.frame_id))
            p.execute()

    def dead_letter(self, source: str, payload: bytes, reason: str) -> None:
        self.stats.deadletter += 1
        log.warning("site %r: dead letter from %s: %s", self.cfg.site, source, reason)
        assert self.redis is not None
        add_dead_letter(self.redis, self.cfg.site, source, payload, reason, self.sid)

    def decide_and_send(self, frames: list[Frame], stop: threading.Event) -> None:
        site = self.cfg.site
        try:
            outcomes, fused, edge_entropy, edge_pred = decide_frames(self.model, frames, self.t1, self.t2, self.device)
        except (RuntimeError, ValueError) as err:  # per-message boundary: the frames go to the dead letters
            for fr in frames:
                self.dead_letter(f"frame {fr.frame_id}", b"", f"decision failed: {err}")
            self.release(frames)
            return
        infos = []
        for i, (fr, (exit_name, pred, entropy, cam)) in enumerate(zip(frames, outcomes)):
            if exit_name == "cloud":
                self.escalate(fr, fused[i], float(edge_entropy[i]), int(edge_pred[i]), stop)
                continue
            dec = Decision(site, fr.frame_id, exit_name, pred, entropy, cam, fr.present, fr.captured_at, time.time(),
                           self.sid, fr.label)
            info = record_and_publish(self.redis, self._scripts["record"], self.mqtt, dec,
                                      self.cfg.decided_ttl_s * 1000, self.cfg.results_maxlen,
                                      lease_keys=self._lease_keys(fr.frame_id))
            if info is not None:
                infos.append(info)
            self.stats.decided[exit_name] += 1
        for info in infos:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)

    def escalate(self, fr: Frame, fused: torch.Tensor, edge_entropy: float, edge_pred: int,
                 stop: threading.Event) -> None:
        site = self.cfg.site
        dtype = fr.observations[0].features.dtype if self.cfg.escalation_dtype == "same" else self.cfg.escalation_dtype
        esc = Escalation(site, fr.frame_id, fr.present, fr.captured_at, FeatureTensor.quantize(fused, dtype),
                         edge_entropy, edge_pred, fr.label)
        raw = esc.encode()
        keys = [topics.escalations_stream(site), topics.escalated_key(site, fr.frame_id),
                topics.result_key(site, fr.frame_id), topics.claimed_key(site),
                topics.claimed_frame_key(site, fr.frame_id)]
        args = [self.cfg.escalation_maxlen, fr.frame_id, raw, self.sid, self.cfg.decided_ttl_s * 1000,
                self.cfg.claim_lease_ms]
        assert self.redis is not None
        delay = 0.005
        while (added := self._scripts["escalate"](keys=keys, args=args)) == 0:  # full: the lease is extended
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
            self.redis.hincrby(topics.counters_key(site), "escalation_conflicts", 1)
            return
        self.stats.decided["cloud"] += 1
        self.stats.escalated_bytes += len(raw)


def _prefix(key: Callable[[str, int], str], site: str) -> str:
    """The part of a per-frame key before the frame id: `ada:{site}:frame:` from `topics.frame_key`."""
    return key(site, 0)[:-1]


# --- CLI ----------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    d = EdgeConfig()
    add_broker_args(p)
    p.add_argument("--checkpoint", default=env_default("CHECKPOINT", d.checkpoint),
                   help="weights (.safetensors) (env ADA_DDNN_CHECKPOINT; default %(default)s)")
    p.add_argument("--t1", type=float, default=None, help="exit 1 threshold (default: the model card's)")
    p.add_argument("--t2", type=float, default=None, help="exit 2 threshold (default: the model card's)")
    p.add_argument("--deadline-ms", type=int, default=env_default("DEADLINE_MS", d.deadline_ms),
                   help="decide a frame this long after its first observation even if cameras are missing "
                        "(env ADA_DDNN_DEADLINE_MS; default %(default)s)")
    p.add_argument("--escalation-maxlen", type=int, default=env_default("ESCALATION_MAXLEN", d.escalation_maxlen),
                   help="escalations waiting for the cloud before the edge waits (env ADA_DDNN_ESCALATION_MAXLEN)")
    p.add_argument("--claim-lease-ms", type=int, default=env_default("CLAIM_LEASE_MS", d.claim_lease_ms),
                   help="a claimed frame not decided within this is taken over by another aggregator "
                        "(env ADA_DDNN_CLAIM_LEASE_MS; default %(default)s)")
    p.add_argument("--device", default=env_default("DEVICE", d.device), help="cpu, cuda, auto (env ADA_DDNN_DEVICE)")
    p.add_argument("--service-id", default="", help="this aggregator's id (default: generated)")
    p.add_argument("--check", action="store_true", help="exit 0 if an aggregator of the site is alive, else 1")


def main(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import load_checkpoint

    if args.check:
        return check_alive(args.redis_url, args.site, "edge", args.service_id or None)
    set_threads(args.threads)
    cfg = EdgeConfig.from_env(site=args.site, mqtt_url=args.mqtt_url, redis_url=args.redis_url,
                              checkpoint=args.checkpoint, t1=args.t1, t2=args.t2, deadline_ms=args.deadline_ms,
                              escalation_maxlen=args.escalation_maxlen, claim_lease_ms=args.claim_lease_ms,
                              device=args.device, service_id=args.service_id)
    model = load_checkpoint(cfg.checkpoint)
    t1, t2 = thresholds_from_card(cfg.checkpoint, cfg.t1, cfg.t2, model.cfg.mode)
    serve(Aggregator(cfg, model, t1, t2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `edge` to the `ada-ddnn` parser."""
    p = subparsers.add_parser("edge", help="edge aggregator: assemble frames, exits 1 and 2, escalate the rest",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=main)
