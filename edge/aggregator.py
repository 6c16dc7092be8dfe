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

Lazy upload (the cameras' choice, `--upload`; the edge takes whatever arrives): a camera sends a
`CameraSummary` (prediction, entropy) and keeps its features. A frame is claimed as soon as one
summary is under T1 (with the summaries that batch brought; `--no-early-exit1` waits for all of
them or the deadline), when all are in, or at the deadline, and leaves at exit 1 from the
summaries alone. Any other frame is asked for once: one `FeatureRequest` on
`ada/{site}/edge/request`, answered by each camera named on `ada/{site}/cam/{k}/feat`. The
answers come on a connection of their own (so the broker's flow control never holds them behind
unacknowledged observations) and are taken ahead of new observations; the frame is decided (exit 2 or cloud) when every answer is in, or
at --request-deadline-ms with the answers that came, the missing cameras named in the
decision's `present`, counted in `features_missing` and listed in `ada:{site}:losses`.

The loop batches its I/O: it drains up to --batch observations, stores them in one pipelined
round trip, acknowledges them to the broker only then (MQTT v5 manual acknowledgement, so an
aggregator that dies holding observations loses none: the broker still has them), decides the
claimed frames in one batch, and records results and escalations in one round trip each.
Results are published without waiting on each PUBACK (paho keeps them across a reconnect).

Nothing it receives stops it: a message that fails validation goes to `ada:{site}:deadletter`
with its reason; so does a frame whose numbers are not finite, alone. Frame ids that every camera
skipped (a broker that dropped them past its queue limit while the edge was away) are named lost
in `ada:{site}:losses` (`never received`) --gap-grace-s after a later frame came. A Redis outage is retried
with capped backoff (the observations in hand are kept and stored afterwards); a broker outage
is paho's reconnect loop. A loop that stops turning is caught by the watchdog.
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import paho.mqtt.client as mqtt
import redis
import torch
from redis.exceptions import NoPermissionError

from edge import sessions
from edge.decisions import REFUSED, REQUEST, Frame, assemble, decide_frames
from edge.edge_net import EdgeModule, load_edge
from edge.exits import under
from edge.frame_store import Claim, FrameStore, StoreTimes
from edge.sessions import Reaped, SessionReaper
from pipeline.checkpoint import thresholds
from pipeline.compute import resolve_device, set_threads
from pipeline.entropy import check_thresholds
from pipeline.errors import AggregationError, EscalationError, MessageError
from pipeline.layers import warm_up
from pipeline.settings import add_command, config_from_args, printed
from pipeline.throttle import Throttle
from pipeline.transport.metrics import Sample, sample
from pipeline.transport.mqtt_client import Inbox, MqttClient
from pipeline.transport.redis_client import Heartbeat, alive, check_alive, redis_client
from pipeline.transport.results_sink import add_dead_letters
from pipeline.transport.service import REDIS_DOWN, Backoff, BrokerRoleConfig, BrokerService, serve, service_id
from pipeline.wire import names
from pipeline.wire.control import FlowStatus, ShedNotice
from pipeline.wire.messages import (
    DTYPES,
    EXIT_NAMES,
    CameraFeatures,
    CameraObservation,
    CameraSummary,
    Decision,
    Escalation,
    FeatureRequest,
    FeatureTensor,
    decode_one_of,
)

log = logging.getLogger(__name__)

DRAIN_S = 5.0  # on stop, store what the broker already sent for at most this long
DECODED_CACHE = 16_384  # decoded observations kept for their frame's claim (about 16 MB of payloads)
FLOW_INTERVAL_S = 0.1  # how often the aggregator tells the cameras its lag
CLOCK_AHEAD_S = 5.0  # an observation captured further ahead of the edge's clock than this has a wrong capture time
SKEW_LOG_S = 60.0  # name a camera whose clock is wrong at most this often
MISSING_LOG_S = 5.0  # report frames decided without some cameras' features at most this often
SHED_LOG_S = 1.0  # log a shed notice at most this often (each is counted and listed in the losses)
ANNOUNCE_S = 10.0  # the site is announced in the registry (ada:sites) again this often: removed by hand while it runs, it is back
REWIND_LOG_S = 60.0  # name cameras whose frame ids went back (a replay started again) at most this often
REWIND_MIN_S = 1.0  # ids going back count as a rewind when captured this much later than the camera's highest id


@dataclass(frozen=True)
class EdgeConfig(BrokerRoleConfig):
    """One edge aggregator (site, brokers and checkpoint as in `BrokerRoleConfig`)."""

    t1: float | None = None  # exit 1 threshold (normalized entropy); none = the model card's
    t2: float | None = None  # exit 2 threshold (normalized entropy); none = the model card's
    expected: int = field(default=0, metadata={"min": 0})  # cameras per frame; 0 = the network's num_cameras
    admit_window: int = field(default=256, metadata={"min": 0})  # frames an observation may be ahead of the second most advanced camera; 0 = no check
    deadline_ms: int = field(default=50, metadata={"min": 1, "max": 86400000})  # after a frame's first observation, decide it this long (ms) later with the cameras that came
    request_deadline_ms: int = field(default=1000, metadata={"min": 1, "max": 86400000})  # lazy upload: after asking the cameras for a frame's features, decide it this long (ms) later with the answers that came
    early_exit1: bool = True  # lazy upload: claim a frame as soon as one summary is under T1 (off: wait for every summary or the deadline, as offline evaluation with all cameras assumes)
    scan_ms: int = field(default=5, metadata={"min": 1, "max": 60_000})  # how often (ms) to look for frames past their deadline
    frame_ttl_s: int = field(default=60, metadata={"min": 1, "max": 31536000})  # an unclaimed frame hash expires after this (s; every aggregator dead)
    decided_ttl_s: int = field(default=3600, metadata={"min": 1, "max": 31536000})  # how long (s) a decided frame refuses late observations (and markers live)
    gap_grace_s: float = field(default=20.0, metadata={"min": 0, "max": 86400})  # a frame id that every camera skipped (its observations dropped on the way, e.g. by a broker past its queue limit) is named lost this long (s) after a later frame came, unless one of its observations comes by then; 0 = never named (needs --admit-window)
    claim_lease_ms: int = field(default=10_000, metadata={"min": 1, "max": 86400000})  # a claimed frame not decided within this (ms) is taken over by another aggregator
    escalation_maxlen: int = field(default=10_000, metadata={"min": 1, "max": 1_000_000_000})  # escalations waiting for the cloud; beyond, the edge waits
    results_maxlen: int = field(default=1_000_000, metadata={"min": 1, "max": 1_000_000_000})  # results kept in the results stream (approximate trim)
    escalation_dtype: str = field(default="same", metadata={"choices": ("same", *DTYPES)})  # dtype of escalated features; same = the cameras'
    batch: int = field(default=256, metadata={"min": 1, "max": 100_000})  # observations stored per Redis round trip at most
    receive_maximum: int = field(default=1024, metadata={"min": 1, "max": 65535})  # unacknowledged observations the broker may send this aggregator at once (MQTT v5)
    session_expiry_s: int = field(default=300, metadata={"min": 0, "max": 4_294_967_295})  # with a stable --service-id, the broker keeps this aggregator's session and its queued observations this long (s) after a disconnect; a generated id always gets a clean session; if it dies, a live aggregator of the site takes the session over (edge.sessions)
    claim_batch: int = field(default=64, metadata={"min": 1, "max": 100_000})  # frames claimed per deadline scan at most
    device: str = "cpu"  # cpu, cuda or auto, for the edge block
    threads: int = field(default=0, metadata={"min": 0})  # torch CPU threads; 0 = torch's default
    service_id: str = ""  # this aggregator's id; "" = generated
    share_group: str = names.SHARE_GROUP  # MQTT v5 shared-subscription group the aggregators share

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's choices and range, as declared on it
        check_thresholds(self.t1, self.t2)
        names.check_share_group(self.share_group)
        if self.service_id:
            names.check_service_id(self.service_id, "service_id")

    @property
    def persistent_session(self) -> bool:
        """A stable --service-id and a session the broker keeps: queued for while away, taken over if dead."""
        return bool(self.service_id) and self.session_expiry_s > 0

    def store_times(self, expected: int) -> StoreTimes:
        return StoreTimes(expected, self.admit_window, self.deadline_ms, self.frame_ttl_s * 1000, self.decided_ttl_s * 1000,
                          self.claim_lease_ms, self.claim_batch, self.escalation_maxlen, self.results_maxlen,
                          round(self.gap_grace_s * 1000))


@dataclass
class EdgeStats:
    observations: int = 0
    claimed: int = 0
    decided: dict[str, int] = field(default_factory=lambda: {name: 0 for name in EXIT_NAMES})
    late: int = 0
    duplicates: int = 0
    reclaimed: int = 0  # frames taken over from an owner whose lease expired
    escalation_conflicts: int = 0  # escalations refused: the frame was already escalated or decided
    deadletter: int = 0  # messages and frames sent to the dead letters
    backpressure_waits: int = 0
    escalated_bytes: int = 0  # encoded Escalation bytes sent to the cloud
    redis_outages: int = 0  # loop turns that met Redis down (each retried after a backoff)
    redis_errors: int = 0  # loop turns Redis refused otherwise (a key of ours overwritten: WRONGTYPE), retried
    ahead: int = 0  # observations refused: beyond the admission window
    shed: int = 0  # observations cameras named as shed (never sent)
    shed_reasons: dict[str, int] = field(default_factory=dict)  # the same, by the cameras' reason
    batches: int = 0  # Redis round trips that stored observations
    never_received: int = 0  # frame ids every camera skipped, named lost after --gap-grace-s (edge.frame_store.NAME_GAP)
    requests: int = 0  # lazy upload: feature requests published (one per frame that did not leave at exit 1)
    features: int = 0  # lazy upload: feature answers taken in
    features_missing: int = 0  # lazy upload: cameras asked whose features had not come by the second deadline
    edge_runs: int = 0  # frames the edge block ran on
    clock_skewed: int = 0  # observations whose capture time is impossible by the edge's clock (left out of the lag)
    rewinds: int = 0  # a camera's frame ids went back while its capture times went on (a replay started again)


class Aggregator(BrokerService):
    """One edge aggregator; `run(stop)` until the event is set (or use start/stop for a thread)."""

    role = "edge"

    def __init__(self, cfg: EdgeConfig, edge: EdgeModule, t1: float | None, t2: float) -> None:
        super().__init__(cfg.service_id or service_id("edge"))
        self.device = resolve_device(cfg.device)
        self.cfg, self.edge, self.t1, self.t2 = cfg, edge.to(self.device).eval(), t1, t2
        self.net = edge.cfg  # the network's ModelConfig: cameras, wire shape, mode
        self.expected = cfg.expected or self.net.num_cameras
        if self.expected > self.net.num_cameras:
            raise ValueError(f"expected: {cfg.expected} cameras per frame, but the network has {self.net.num_cameras}")
        if cfg.admit_window == 0 and cfg.gap_grace_s > 0:
            log.warning("edge: --gap-grace-s %g does nothing with --admit-window 0 (gaps are found from the cameras' "
                        "fronts, which only admission keeps): frame ids every camera skipped will not be named lost",
                        cfg.gap_grace_s)
        self.stats = EdgeStats()
        self.inbox = Inbox(lambda: self.mqtt.generation if self.mqtt is not None else 0,
                           urgent=lambda m: m.topic.endswith("/feat"))
        self.store: FrameStore | None = None
        self.answers: MqttClient | None = None  # lazy upload: the connection feature answers come on
        self._session_gens = (-1, -1)  # the connections' generations when the session was last registered
        self.reaper: SessionReaper | None = None  # takes over the MQTT sessions of dead aggregators (edge.sessions)
        self._held: list[tuple[int, mqtt.MQTTMessage]] = []  # taken from the inbox, not yet stored
        self._lags: list[tuple[int, float]] = []  # (camera, capture -> stored delay in ms) since the last flow status
        self._skew_log = Throttle(SKEW_LOG_S)  # by camera: its wrong clock named at most once a period
        self._missing_log = Throttle(MISSING_LOG_S)  # frames decided without some features: a line per period
        self._shed_log = Throttle(SHED_LOG_S)  # shed notices: a line per period
        self._shed_pending = _no_shed()  # shed notices since that line
        self._missing_frames = 0  # such frames since then
        self._blind_frames = 0  # frames answered from their summaries alone (no feature came) since then
        self._highest: dict[int, tuple[int, float]] = {}  # camera -> (highest frame id it sent here, its capture time)
        self._rewind_log = Throttle(REWIND_LOG_S)
        self._announce_denied = False  # the registry refused this aggregator's user (said once)
        # Observations decoded at ingest, by their bytes: a claimed frame's payloads come back from
        # Redis and need no second decode (bounded; a miss just decodes again).
        self._decoded: collections.OrderedDict[bytes, CameraObservation] = collections.OrderedDict()
        self._stored_at = time.monotonic()  # when observations were last stored
        # The flow topic names this aggregator by a digest of its id: its MQTT client id stays
        # secret, so a client that can read the topic cannot take over its session.
        self.flow_id = names.flow_id(self.sid)
        shape = (2, self.net.fused_channels, *self.net.wire_shape[1:])  # two rows: forward_rows' batch path
        log.info("edge %s: edge block warmed up in %.2f s", self.sid,
                 warm_up(self.edge, torch.zeros(shape, device=self.device)))

    # -- wiring --
    def metric_samples(self) -> list[Sample]:
        st, site = self.stats, self.cfg.site
        out = [sample("ada_observations", st.observations, site=site),
               sample("ada_dead_letters", st.deadletter, site=site),
               sample("ada_frames_reclaimed", st.reclaimed,
                       site=site),
               sample("ada_redis_outages", st.redis_outages, site=site),
               sample("ada_redis_errors", st.redis_errors, site=site),
               sample("ada_backpressure_waits", st.backpressure_waits,
                       site=site),
               sample("ada_escalated_bytes", st.escalated_bytes,
                       site=site),
               sample("ada_feature_requests", st.requests, site=site),
               sample("ada_features_missing", st.features_missing, site=site),
               sample("ada_frames_never_received", st.never_received, site=site),
               sample("ada_qos0_dropped", self.inbox.dropped_qos0, site=site),
               sample("ada_edge_block_runs", st.edge_runs, site=site),
               sample("ada_clock_skewed", st.clock_skewed, site=site),
               sample("ada_frame_id_rewinds", st.rewinds, site=site),
               sample("ada_sessions_taken_over", self.reaper.taken if self.reaper else 0, site=site),
               sample("ada_backlog", len(self.inbox) + len(self._held), site=site,
                     queue="inbox")]
        out += [sample("ada_frames_decided", n, site=site, exit=e)
                for e, n in st.decided.items()]
        out += [sample("ada_observations_rejected", n, site=site, reason=r)
                for r, n in (("late", st.late), ("duplicate", st.duplicates), ("ahead", st.ahead))]
        out += [sample("ada_frames_shed", n, site=site,
                        reason=r) for r, n in st.shed_reasons.items()]
        mq = self.mqtt
        if mq is not None:
            out.append(sample("ada_mqtt_reconnects", mq.reconnects, site=site))
        r = self.redis
        if r is not None:
            try:
                out.append(sample("ada_backlog", r.zcard(names.pending_key(site)), site=site,
                                 queue="open_frames"))
                out.append(sample("ada_backlog", r.xlen(names.escalations_stream(site)),
                                 site=site, queue="escalations"))
            except REDIS_DOWN:
                pass  # Redis away: the scrape has the in-process figures only
        return out

    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        self.store = FrameStore(self.redis, cfg.site, self.sid, cfg.store_times(self.expected))
        self.store.on_reload = self._announce_again
        self._announce()
        if cfg.service_id and alive(self.redis, cfg.site, "edge", self.sid):
            log.warning("edge %s: site %r: an aggregator with this --service-id is alive (its heartbeat): unless it is "
                        "this one's previous run, stopped moments ago, two processes share the id and will keep "
                        "taking over each other's MQTT session", self.sid, cfg.site)
        if cfg.request_deadline_ms < 10:
            log.warning("edge %s: --request-deadline-ms %d is shorter than a feature request's round trip (a few ms "
                        "on one host): frames will be decided without the features they ask for", self.sid,
                        cfg.request_deadline_ms)
        sub = names.shared_obs_filter(cfg.site, cfg.share_group)

        def on_connect(c: mqtt.Client) -> None:
            c.subscribe([(sub, 1), (names.shared_shed_filter(cfg.site, cfg.share_group), 1)])

        # A persistent session only helps an aggregator that comes back under the same id: one under
        # a generated id would leave the broker routing its share of observations to a dead session.
        expiry = cfg.session_expiry_s if cfg.service_id else 0
        if cfg.session_expiry_s and not cfg.service_id:
            log.info("edge %s: no --service-id, so a clean MQTT session (a restart cannot resume it)", self.sid)
        main_id, answers_id = sessions.client_ids(cfg.site, self.sid)  # the ids a reaper resumes if this aggregator dies
        self.mqtt = MqttClient(cfg.mqtt_url, main_id, on_connect=on_connect, on_message=self.inbox.put,
                               manual_ack=True, receive_maximum=cfg.receive_maximum, session_expiry_s=expiry)
        self.mqtt.connect()
        feat = names.shared_features_filter(cfg.site, cfg.share_group)
        self.answers = MqttClient(cfg.mqtt_url, answers_id, on_connect=lambda c: c.subscribe(feat, qos=1),
                                  on_message=lambda m: self.inbox.put(m, self.answers.generation if self.answers else 0),
                                  manual_ack=True, receive_maximum=cfg.receive_maximum, session_expiry_s=expiry)
        self.answers.connect()
        self._register_session()
        # Beating from here on: while a broker was still being waited for, the loop was not turning.
        self.heartbeat = Heartbeat(self.redis, cfg.site, "edge", self.sid, cfg.heartbeat_s, self._beat_info,
                                   self.healthy).start()
        self.reaper = SessionReaper(self.redis, cfg.mqtt_url, cfg.site, self.sid, cfg.share_group, self.inbox.put,
                                    cfg.receive_maximum, cfg.heartbeat_s)
        self.start_watchdog()
        log.info("edge %s: site %r, subscribed %s, t1=%s t2=%s, deadline %d ms (features %d ms), %d cameras expected",
                 self.sid, cfg.site, sub, self.t1, self.t2, cfg.deadline_ms, cfg.request_deadline_ms, self.expected)

    def _announce(self) -> bool:
        """Announce the site to the cloud workers that serve every site (`--sites '*'`); True if
        the registry did not have it."""
        try:
            return bool(self.redis.sadd(names.sites_key(), self.cfg.site))
        except NoPermissionError as err:
            if self._announce_denied:
                return False
            self._announce_denied = True
            log.warning("edge %s: site %r not announced in %s (%s): a cloud worker with --sites '*' does not see it",
                        self.sid, self.cfg.site, names.sites_key(), err)
            return False

    def _announce_again(self) -> None:
        """Redis forgot the scripts: it restarted. If it lost its data too (the site's entry in the
        registry is gone), say so, and announce the site and this aggregator's session again."""
        cfg = self.cfg
        if self._announce():
            log.error("edge %s: Redis restarted without its data (site %r was no longer in %s): the frames that were "
                      "assembling, claimed or waiting for features there, and the counters, are lost with it; "
                      "announcing the site%s again", self.sid, cfg.site, names.sites_key(),
                      " and this aggregator's session" if cfg.persistent_session else "")
        self._register_session()

    def _register_session(self) -> None:
        """Note this aggregator's persistent session (`--service-id`) in the site's registry, so that
        another takes it over if it dies. Again at every reconnect and every ANNOUNCE_S: an
        aggregator that stalled long enough to be judged dead (its session taken over, ended and
        unregistered) and then went on runs with a new session nobody would take over."""
        if self.redis is None or self.mqtt is None or self.answers is None:
            return  # not connected yet, or closing
        gens = (self.mqtt.generation, self.answers.generation)
        if self.cfg.persistent_session:
            sessions.register(self.redis, self.cfg.site, self.sid, self.cfg.session_expiry_s)
        self._session_gens = gens

    def _beat_info(self) -> dict:
        return {"observations": self.stats.observations, "decided": dict(self.stats.decided), "late": self.stats.late,
                "reclaimed": self.stats.reclaimed, "inbox": len(self.inbox) + len(self._held),
                "unconfirmed": self.mqtt.unconfirmed if self.mqtt else 0, "loop_age_s": round(self.watchdog.age(), 3)}

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        scan_s = self.cfg.scan_ms / 1000.0
        next_scan = next_flow = time.monotonic()
        next_announce = next_scan + ANNOUNCE_S
        backoff = Backoff()
        while not stop.is_set():
            self.watchdog.tick()
            if time.monotonic() >= next_flow:
                self.publish_flow()
                self._say_shed()  # the shed notices of a quiet second, if no later one came
                next_flow = time.monotonic() + FLOW_INTERVAL_S
            if not self._held:
                self._held = self.inbox.take(self.cfg.batch, max(0.0, next_scan - time.monotonic()))
            try:
                if time.monotonic() >= next_announce:
                    next_announce = time.monotonic() + ANNOUNCE_S
                    if self._announce():
                        log.warning("edge %s: site %r was not in the registry %s (removed while this aggregator runs?): "
                                    "announced again, so that cloud workers serving every site go on serving it",
                                    self.sid, self.cfg.site, names.sites_key())
                    self._register_session()
                elif self._session_gens != (self.mqtt.generation, self.answers.generation):
                    self._register_session()  # reconnected: maybe a new session, if the last one was taken over
                claimed = self.ingest()
                if self.reaper is not None:
                    self.reaper.tick()
                if time.monotonic() >= next_scan:
                    claimed.extend(self.sweep())
                    next_scan = time.monotonic() + scan_s
                if claimed:
                    self.decide_and_send(claimed, stop)
                backoff.reset()
            except REDIS_DOWN as err:  # the observations in hand stay held; claimed frames come back by lease
                self.stats.redis_outages += 1
                delay = backoff.next()
                log.warning("edge %s: Redis unavailable (%s); %d observations held, retrying in %.1f s", self.sid,
                            err, len(self._held) + len(self.inbox), delay)
                stop.wait(delay)
            except redis.ResponseError as err:  # e.g. WRONGTYPE: a key of ours overwritten; an operator's to mend
                self.stats.redis_errors += 1
                delay = backoff.next()
                log.error("edge %s: Redis refused a command: %s; %d observations held (unacknowledged: the broker "
                          "keeps the rest), retrying in %.1f s", self.sid, err, len(self._held) + len(self.inbox), delay)
                stop.wait(delay)
            except EscalationError as err:
                if not stop.is_set():
                    raise
                log.info("edge %s: %s", self.sid, err)

    def close(self) -> None:
        """Stop taking observations, store and acknowledge those in hand (so that the broker can
        forget them), then close the connections. Frames already claimed keep their lease: if
        this aggregator does not come back, another one takes them over.

        The last aggregator of a site with a persistent session (`--service-id`) keeps its
        subscriptions: the broker then queues the observations and feature answers published
        while it is away for its session (--session-expiry-s) and hands them over when it comes
        back, instead of dropping them for want of a subscriber. With other aggregators alive it
        unsubscribes, so that they take its share at once."""
        self._say_shed(now=True)
        if self.mqtt is not None and self.store is not None and self.mqtt.connected.is_set():
            keep = self._keep_subscriptions()
            if keep:
                log.info("edge %s: the site's last aggregator, with a persistent session: keeping its subscriptions, "
                         "so the broker queues what the cameras send for %d s until it is back", self.sid,
                         self.cfg.session_expiry_s)
            else:
                log.info("edge %s: %s: unsubscribing, so that %s", self.sid,
                         "other aggregators of the site are alive" if self.cfg.persistent_session
                         else "no persistent session",
                         "they take this one's share at once" if self.cfg.persistent_session
                         else "the broker keeps nothing for it")
                self.mqtt.client.unsubscribe(names.shared_obs_filter(self.cfg.site, self.cfg.share_group))
                if self.answers is not None:
                    self.answers.client.unsubscribe(names.shared_features_filter(self.cfg.site, self.cfg.share_group))
            end = time.monotonic() + DRAIN_S
            left = len(self.inbox)  # kept subscriptions: only what already came (the rest waits in the broker)
            try:
                while time.monotonic() < end:
                    if not self._held and (not keep or left > 0):
                        self._held = self.inbox.take(self.cfg.batch, 0.05)
                        left -= len(self._held)
                    if not self._held:
                        break
                    if claimed := self.ingest():
                        log.info("edge %s: stopping; %d frames claimed now wait for their lease (%d ms) to be taken "
                                 "over", self.sid, len(claimed), self.cfg.claim_lease_ms)
            except (*REDIS_DOWN, redis.ResponseError) as err:
                log.warning("edge %s: stopping with Redis down or refusing (%s); %d observations unacknowledged stay "
                            "with the broker", self.sid, err, len(self._held) + len(self.inbox))
            self.mqtt.publish(names.flow_topic(self.cfg.site, self.flow_id), b"", qos=1, retain=True)  # clears it
            if not keep and self.cfg.persistent_session:
                try:
                    sessions.unregister(self.redis, self.cfg.site, self.sid)  # unsubscribed: nothing to take over
                except (*REDIS_DOWN, redis.ResponseError):
                    pass  # left registered: another aggregator finds the session empty and ends it
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
        if self.answers is not None:
            self.answers.close()
            self.answers = None
        super().close()

    def _keep_subscriptions(self) -> bool:
        """On stopping: True for a persistent session with no other aggregator of the site alive.
        This aggregator's own heartbeat goes first: of aggregators stopped together (a compose
        restart), each that looks next sees the others' gone or going, so the last to look keeps
        its subscriptions (all of them may), and the broker goes on queueing for the site."""
        if not self.cfg.persistent_session or self.redis is None:
            return False
        try:
            if self.heartbeat is not None:
                self.heartbeat.stop()  # its key deleted now (close() stops it again: a no-op)
            others = [s for s in alive(self.redis, self.cfg.site, "edge") if s != self.sid]
        except REDIS_DOWN:
            return True  # cannot tell: keeping loses nothing while this aggregator comes back in time
        return not others

    def handle(self, msgs: list[mqtt.MQTTMessage]) -> list[Frame]:
        """Store messages received on the current connection (what `run` does with each batch)."""
        gen = self.mqtt.generation if self.mqtt is not None else 0
        self._held.extend((gen, m) for m in msgs)
        return self.ingest()

    def ingest(self) -> list[Frame]:
        """Store the held messages (dead-lettering the invalid ones) and acknowledge them to the
        broker; the frames they completed, now claimed by this aggregator: frames whose cameras
        all reported, frames with a summary under T1 (lazy upload), and frames whose requested
        features are all in."""
        if not self._held:
            return []
        assert self.store is not None and self.redis is not None and self.mqtt is not None
        good: list[tuple[mqtt.MQTTMessage, CameraObservation | CameraSummary]] = []
        answers: list[tuple[mqtt.MQTTMessage, CameraFeatures]] = []
        bad: list[tuple[mqtt.MQTTMessage, str]] = []
        losses: list[tuple[int, int, str, str]] = []
        for _, msg in self._held:
            try:
                if msg.topic.endswith("/shed"):
                    losses.extend(self._shed(msg))
                elif msg.topic.endswith("/feat"):
                    feat = CameraFeatures.decode(msg.payload)
                    self._validate_features(feat, msg.topic)
                    answers.append((msg, feat))
                else:
                    obs = decode_one_of(msg.payload, CameraObservation, CameraSummary)
                    self._validate(obs, msg.topic)
                    good.append((msg, obs))
            except (MessageError, AggregationError) as err:
                bad.append((msg, str(err)))
            except Exception as err:  # noqa: BLE001 - the per-message boundary: nothing a device sends stops the edge
                log.exception("edge %s: unexpected error on a message from %s", self.sid, msg.topic)
                bad.append((msg, f"unexpected {type(err).__name__}: {err}"))
        if bad:
            self.dead_letter([(msg.topic, msg.payload, reason) for msg, reason in bad])
        payloads = [bytes(msg.payload) for msg, _ in good]
        statuses = self.store.add([(obs, raw) for (_, obs), raw in zip(good, payloads)])
        # The shed notices after the batch's observations: a view that came is never named shed.
        notices = losses
        losses, beyond = self.store.record_shed(notices)  # a frame claimed already names its cameras in its decision
        if beyond:  # one dead letter a camera, naming its first id and how many more
            first: dict[int, int] = {}
            for fid, camera, _, _ in beyond:
                first.setdefault(camera, fid)
            per_camera = collections.Counter(camera for _, camera, _, _ in beyond)
            self.dead_letter([(names.shed_topic(self.cfg.site, camera), b"",
                               f"site {self.cfg.site!r} camera {camera}: shed notice of frame {fid} (and "
                               f"{per_camera[camera] - 1} more), more than {self.cfg.admit_window} frames ahead of "
                               "the other cameras; refused") for camera, fid in first.items()])
        self.stats.shed += len(losses)
        for *_, reason in losses:
            self.stats.shed_reasons[reason] = self.stats.shed_reasons.get(reason, 0) + 1
        if notices:
            self._note_shed(notices, len(losses), len(beyond))
        answer_payloads = [bytes(msg.payload) for msg, _ in answers]
        completed = self.store.add_features([(f, raw) for (_, f), raw in zip(answers, answer_payloads)])
        # Kept for the claim only where one is to come: not for a late, duplicate or refused message
        # (with early exit 1 most summaries arrive after their frame left: they would fill the cache).
        kept = [(obs, raw) for ((_, obs), raw), (status, _) in zip(zip(good, payloads), statuses)
                if status in ("added", "claimed")]
        kept += [(f, raw) for ((_, f), raw), c in zip(zip(answers, answer_payloads), completed)
                 if isinstance(c, Claim) or c == "added"]
        for obs, raw in kept:
            self._decoded[raw] = obs
        while len(self._decoded) > DECODED_CACHE:
            self._decoded.popitem(last=False)
        now = time.time()
        self._lags.extend(self._plausible_lags([obs for (_, obs), (status, _) in zip(good, statuses)
                                                if status in ("added", "claimed", "late")], now))
        self._stored_at = time.monotonic()
        for gen, msg in self._held:
            if isinstance(gen, Reaped):  # it came on a dead aggregator's session this one took over
                gen.client.ack(msg, gen.generation)
                if self.reaper is not None:
                    self.reaper.acknowledged()
            elif msg.topic.endswith("/feat") and self.answers is not None:
                self.answers.ack(msg, gen)
            else:
                self.mqtt.ack(msg, gen)
        self.stats.observations += len(self._held) - len(answers)
        self.stats.features += len(answers)
        self.stats.batches += 1
        self._held = []
        frames, ahead, confident = [], [], set()
        for (msg, obs), (status, stored) in zip(good, statuses):
            if status != "ahead":
                self._note_rewind(obs)
            if status == "late":
                self.stats.late += 1
            elif status == "duplicate":
                self.stats.duplicates += 1
            elif status == "ahead":
                ahead.append((msg.topic, msg.payload, f"site {obs.site!r} frame {obs.frame_id} camera {obs.camera}: "
                              f"more than {self.cfg.admit_window} frames ahead of the other cameras; refused"))
            elif status == "claimed":
                frames.extend(self._frames([Claim(obs.frame_id, stored, "claimed")]))
            elif isinstance(obs, CameraSummary) and self.cfg.early_exit1 and self.t1 is not None \
                    and bool(under(torch.tensor([obs.entropy]), self.t1)[0]):
                confident.add(obs.frame_id)  # status "added": claim it after the batch's other summaries
        confident -= {fr.frame_id for fr in frames}
        if confident:
            frames.extend(self._frames(self.store.claim_confident(sorted(confident))))
        frames.extend(self._frames(c for c in completed if isinstance(c, Claim)))
        if ahead:
            self.stats.ahead += len(ahead)
            self.dead_letter(ahead)
        unasked = [(msg.topic, msg.payload, f"site {f.site!r} frame {f.frame_id} camera {f.camera}: features the "
                    "edge did not ask of this camera; refused") for (msg, f), c in zip(answers, completed) if c == "unasked"]
        if unasked:
            self.dead_letter(unasked)
        return frames

    def _note_shed(self, notices: list[tuple[int, int, str, str]], named: int, refused: int) -> None:
        """Add shed notices to those the next log line tells of (`_say_shed`)."""
        p = self._shed_pending
        ids = [fid for fid, *_ in notices]
        p["views"] += len(notices)
        p["named"] += named
        p["refused"] += refused
        p["cameras"] |= {c for _, c, _, _ in notices}
        p["why"] |= {why for *_, why in notices}
        p["lo"], p["hi"] = min(p["lo"], min(ids)), max(p["hi"], max(ids))
        self._say_shed()

    def _say_shed(self, now: bool = False) -> None:
        """One log line a second at most for the shed notices noted since the last one (every
        notice is told: those of a quiet second in the next line, the run loop's or close's)."""
        p = self._shed_pending
        if not p["views"] or not (now or self._shed_log()):
            return
        log.warning("site %r: cameras %s shed %d views (%s) of frames %d..%d: %d named lost, %d void (the frame had the "
                    "view, was decided, or had it named before), %d refused (ahead); %d views named shed so far (one "
                    "such line a second at most)", self.cfg.site, sorted(p["cameras"]), p["views"],
                    ", ".join(sorted(p["why"])), p["lo"], p["hi"], p["named"], p["views"] - p["named"] - p["refused"],
                    p["refused"], self.stats.shed)
        self._shed_pending = _no_shed()

    def _shed(self, msg: mqtt.MQTTMessage) -> list[tuple[int, int, str, str]]:
        """The losses a camera's ShedNotice names (validated like an observation)."""
        notice = ShedNotice.decode(msg.payload)
        if notice.site != self.cfg.site or msg.topic != names.shed_topic(notice.site, notice.camera):
            raise AggregationError(self.cfg.site, None, f"shed notice of site {notice.site!r} on topic {msg.topic}",
                                   camera=notice.camera)
        if notice.camera >= self.net.num_cameras:
            raise AggregationError(self.cfg.site, notice.frame_ids[0], "shed notice of a camera beyond the network's "
                                   f"{self.net.num_cameras} cameras", camera=notice.camera)
        frame_ids = sorted(set(notice.frame_ids))  # each frame once: a repeated id is one loss, not many
        return [(f, notice.camera, "camera", notice.reason) for f in frame_ids]

    def _note_rewind(self, obs: CameraObservation | CameraSummary) -> None:
        """Follow each camera's highest frame id; a lower id captured later than it (by more than
        REWIND_MIN_S: a resend or a reordered message keeps its old capture time) means the
        camera's ids started again: a replay run again on this site. Frames the site decided
        within --decided-ttl-s are not decided again (their observations are late): say so."""
        top = self._highest.get(obs.camera)
        if top is None or obs.frame_id > top[0]:
            self._highest[obs.camera] = (obs.frame_id, obs.captured_at)
            return
        if obs.frame_id < top[0] and obs.captured_at > top[1] + REWIND_MIN_S:
            self._highest[obs.camera] = (obs.frame_id, obs.captured_at)
            self.stats.rewinds += 1
            if self._rewind_log():
                log.warning("edge %s: site %r camera %d: frame ids went back from %d to %d, captured %.0f s later (a "
                            "replay started again on this site?): frames the site decided in the last %d s "
                            "(--decided-ttl-s) are not decided again, their observations count as late; replay them "
                            "under a site id of their own (rewinds so far: %d)", self.sid, self.cfg.site,
                            obs.camera, top[0], obs.frame_id, obs.captured_at - top[1], self.cfg.decided_ttl_s,
                            self.stats.rewinds)

    def _plausible_lags(self, observations: list[CameraObservation | CameraSummary],
                        now: float) -> list[tuple[int, float]]:
        """Capture -> stored delays (ms) of `observations` for the flow status, without those whose
        capture time the edge's clock rules out: more than CLOCK_AHEAD_S ahead, or older than
        --decided-ttl-s (a device that booted without its clock, a local time taken for UTC). One
        camera with a wrong clock must not make every camera of the site shed; each such
        observation is counted (`clock_skewed`) and its camera named in the log. Its frame is
        decided as usual (deadlines run on the Redis clock from the first arrival)."""
        lags = []
        for obs in observations:
            lag_s = now - obs.captured_at
            if -CLOCK_AHEAD_S <= lag_s <= self.cfg.decided_ttl_s:
                lags.append((obs.camera, lag_s * 1000))
                continue
            self.stats.clock_skewed += 1
            if self._skew_log(obs.camera):
                log.warning("edge %s: site %r camera %d: frame %d was captured %.4g s %s the edge's clock: is the "
                            "camera's clock set (NTP)? Its delay is left out of the flow status (%d such observations "
                            "so far)", self.sid, self.cfg.site, obs.camera, obs.frame_id, abs(lag_s),
                            "before" if lag_s > 0 else "after", self.stats.clock_skewed)
        return lags

    def publish_flow(self) -> None:
        """Tell the cameras how late observations reach this aggregator (retained FlowStatus)."""
        if self.mqtt is None:
            return
        lags, self._lags = self._lags, []
        backlog = len(self.inbox) + len(self._held)
        if lags:
            lag = site_lag(lags)
        else:  # nothing stored lately: with observations waiting, the loop is held up (the cloud is behind)
            lag = (time.monotonic() - self._stored_at) * 1000 if backlog else 0.0
        status = FlowStatus(self.cfg.site, self.flow_id, max(0.0, lag), backlog, time.time())
        self.mqtt.publish(names.flow_topic(self.cfg.site, self.flow_id), status.encode(), qos=0, retain=True)

    def _check_source(self, msg: CameraObservation | CameraSummary | CameraFeatures, topic: str, expected: str,
                      what: str) -> None:
        """A camera message must come from this site, on its camera's own topic, from a camera the network has."""
        cfg = self.cfg
        if msg.site != cfg.site or topic != expected:
            raise AggregationError(cfg.site, msg.frame_id, f"{what} of site {msg.site!r} on topic {topic}",
                                   camera=msg.camera)
        if msg.camera >= self.net.num_cameras:
            raise AggregationError(cfg.site, msg.frame_id, "camera id beyond the network's cameras", camera=msg.camera)

    def _check_shape(self, msg: CameraObservation | CameraFeatures) -> None:
        if msg.features.shape != self.net.wire_shape:
            raise AggregationError(self.cfg.site, msg.frame_id, f"features {msg.features.shape}, expected "
                                   f"{self.net.wire_shape}", camera=msg.camera)

    def _validate(self, obs: CameraObservation | CameraSummary, topic: str) -> None:
        cfg, net = self.cfg, self.net
        self._check_source(obs, topic, names.obs_topic(obs.site, obs.camera), "observation")
        for what, value in (("prediction", obs.prediction), ("label", obs.label)):
            if value is not None and not 0 <= value < net.num_classes:
                raise AggregationError(cfg.site, obs.frame_id, f"{what} {value} is not one of the network's "
                                       f"{net.num_classes} classes", camera=obs.camera)
        if isinstance(obs, CameraSummary):
            if not net.has_camera_classifiers:
                raise AggregationError(cfg.site, obs.frame_id, f"a summary (lazy upload) needs camera classifiers; "
                                       f"mode {net.mode!r} cameras upload eagerly", camera=obs.camera)
            return
        self._check_shape(obs)
        if (obs.entropy is None) == net.has_camera_classifiers:
            raise AggregationError(cfg.site, obs.frame_id, f"camera prediction does not fit mode {net.mode!r}",
                                   camera=obs.camera)

    def _validate_features(self, feat: CameraFeatures, topic: str) -> None:
        self._check_source(feat, topic, names.features_topic(feat.site, feat.camera), "features")
        self._check_shape(feat)

    def _frames(self, claims: Iterable[Claim]) -> list[Frame]:
        """The claimed frames of their stored payloads (decoded at ingest, else now). A frame with a
        stored payload that does not decode (written by something else, or by an older wire
        version before an upgrade) goes to the dead letters and its claim is released: decoding it
        again after a restart would fail the same way, for every aggregator that took it over."""
        frames, bad = [], []
        for claim in claims:
            try:
                frames.append(self._frame(claim))
            except MessageError as err:
                bad.append((claim.frame_id, str(err)))
        if bad:
            self.dead_letter([(f"frame {fid}", b"", f"site {self.cfg.site!r} frame {fid}: a stored message does not "
                               f"decode: {reason}") for fid, reason in bad])
            self.store.release([fid for fid, _ in bad])
        return frames

    def _frame(self, claim: Claim) -> Frame:
        decoded = [self._decoded.pop(p, None) for p in claim.payloads]
        messages = [m if m is not None else decode_one_of(p, CameraObservation, CameraSummary, CameraFeatures)
                    for m, p in zip(decoded, claim.payloads)]
        self.stats.claimed += 1
        frame = assemble(claim.frame_id, messages, claim.kind == "reclaimed", claim.requested)
        frame.nbytes = sum(len(p) for p in claim.payloads)
        return frame

    def sweep(self) -> list[Frame]:
        """The deadline scan: first store what reached the inbox during the loop's turn (one more
        batch, feature answers first), so that an answer or a summary already received is never
        judged missing because the loop was busy; then claim the frames past their deadlines."""
        frames: list[Frame] = []
        if len(self.inbox):
            self._held.extend(self.inbox.take(self.cfg.batch, 0.0))
            frames = self.ingest()
        return frames + self.claim_expired()

    def claim_expired(self) -> list[Frame]:
        """Claim the frames past their deadline (or second deadline), and take over the claims
        whose lease expired."""
        assert self.store is not None
        site, cfg = self.cfg.site, self.cfg
        claims, owners, never = [], [], []
        for claim in self.store.claim_expired():
            if claim.kind == "never":
                never.append(claim.frame_id)
                continue
            if claim.kind == "lost":
                log.error("edge %s: site %r frame %d: its claim expired with its observations (no aggregator for "
                          "%d s); the frame has no result", self.sid, site, claim.frame_id, cfg.decided_ttl_s)
                continue
            if claim.kind == "reclaimed":
                owners.append(claim.prev or "?")
                log.debug("edge %s: site %r frame %d: lease of %s expired, re-claimed", self.sid, site, claim.frame_id,
                          claim.prev)
            claims.append(claim)
        frames = self._frames(claims)
        if never:
            self.stats.never_received += len(never)
            log.error("edge %s: site %r: no observation of %d frames (%s) came within %.0f s of a later frame's: named "
                      "lost in %s (why 'never received': a broker past its queue limit drops observations unseen; or the "
                      "cameras' frame ids jumped, a run started further on, and these ids were never captured)", self.sid,
                      site, len(never), _ids(never), cfg.gap_grace_s, names.losses_stream(site))
        if owners:
            self.stats.reclaimed += len(owners)
            log.warning("edge %s: site %r: re-claimed %d frames whose lease (%d ms) expired, claimed by %s", self.sid,
                        site, len(owners), cfg.claim_lease_ms, ", ".join(sorted(set(owners))))
        return frames

    def dead_letter(self, letters: list[tuple[str, bytes, str]]) -> None:
        """(source, payload, reason) of each rejected message or frame, in one round trip."""
        assert self.redis is not None
        self.stats.deadletter += len(letters)
        for source, _, reason in letters[:5]:
            log.warning("site %r: dead letter from %s: %s", self.cfg.site, source, reason)
        if len(letters) > 5:
            log.warning("site %r: %d more dead letters in this batch", self.cfg.site, len(letters) - 5)
        add_dead_letters(self.redis, self.cfg.site, letters, self.sid)

    def decide_and_send(self, frames: list[Frame], stop: threading.Event) -> None:
        assert self.store is not None and self.mqtt is not None
        site = self.cfg.site
        try:
            outcomes, fused, edge_entropy, edge_pred = decide_frames(self.edge, frames, self.t1, self.t2, self.device)
        except (RuntimeError, ValueError) as err:  # per-message boundary: the frames go to the dead letters
            self.dead_letter([(f"frame {fr.frame_id}", b"", f"decision failed: {err}") for fr in frames])
            self.store.release([fr.frame_id for fr in frames])
            return
        decisions: list[tuple[Frame, Decision, bytes]] = []
        escalations: list[tuple[Frame, bytes]] = []
        requests: list[Frame] = []
        refused: list[tuple[Frame, str]] = []
        now = time.time()
        runs = 0
        for i, (fr, (exit_name, pred, entropy, cam)) in enumerate(zip(frames, outcomes)):
            runs += not torch.isnan(edge_entropy[i])
            try:
                if exit_name == REFUSED:
                    raise MessageError("its features or the edge block's output are not finite")
                if exit_name == REQUEST:
                    requests.append(fr)
                    continue
                if exit_name == "cloud":
                    escalations.append((fr, self._escalation(fr, fused[i], float(edge_entropy[i]),
                                                             int(edge_pred[i]))))
                    continue
                dec = Decision(site, fr.frame_id, exit_name, pred, entropy, cam, fr.present, fr.captured_at, now,
                               self.sid, fr.label)
                decisions.append((fr, dec, dec.encode()))
            except MessageError as err:
                refused.append((fr, str(err)))
        self.stats.edge_runs += runs
        if refused:
            self.dead_letter([(f"frame {fr.frame_id}", b"", f"site {site!r} frame {fr.frame_id}: {reason}")
                              for fr, reason in refused])
            self.store.release([fr.frame_id for fr, _ in refused])
        self.request_features(requests)
        done: list[tuple[Frame, str]] = []
        for (fr, dec, raw), first in zip(decisions, self.store.record([(d, r) for _, d, r in decisions])):
            if first:
                self.mqtt.publish(names.results_topic(site), raw)
                self.stats.decided[dec.exit] += 1
                self.metrics.observe(site, dec.exit, dec.decided_at - dec.captured_at)
                done.append((fr, dec.exit))
        done += [(fr, "cloud") for fr in self.escalate(escalations, stop)]
        self._account(done, runs)

    def request_features(self, frames: list[Frame]) -> None:
        """Lazy upload: publish one FeatureRequest a frame, then hand the frames to the feature
        wait (one round trip). The request goes first, so the Redis round trip that registers
        the wait is not on the frame's latency path, and an aggregator that dies in between
        leaves a frame whose cameras were asked: its lease hands it on, with the answers that
        came. No answer is lost for it: this loop stores answers only after the registration, and
        one that another aggregator stores before it is counted when it comes (REQUEST_FEATURES
        counts the answers in: with all of them, the frame is due at once). A request whose
        registration finds the frame asked for already (a slow owner after a take-over) or
        decided went out for nothing: counted in `requests_void`, its answers as duplicates or
        late."""
        if not frames:
            return
        assert self.store is not None and self.mqtt is not None
        site, reqs = self.cfg.site, [FeatureRequest(self.cfg.site, fr.frame_id, fr.wanted).encode() for fr in frames]
        for raw in reqs:
            self.mqtt.publish(names.request_topic(site), raw)
        self.stats.requests += len(reqs)
        self.store.request([(fr.frame_id, fr.wanted, len(raw) * self.expected) for fr, raw in zip(frames, reqs)],
                           self.cfg.request_deadline_ms)

    def _account(self, done: list[tuple[Frame, str]], runs: int) -> None:
        """Counters of the frames this call decided or escalated first (one round trip): what the
        cameras sent for each, by exit (requests counted as every camera of the site receives
        them), the edge block's runs, and the cameras whose features never came, named as losses."""
        assert self.store is not None
        site = self.cfg.site
        counts: dict[str, int] = {"edge_runs": runs}
        losses = []
        for fr, exit_name in done:
            sent = fr.nbytes
            if fr.requested:
                sent += len(FeatureRequest(site, fr.frame_id, fr.asked).encode()) * self.expected if fr.asked else 0
                # Named: the cameras whose features did not come and that the decision does not use. A
                # frame none of whose features came is answered by its cameras' verdicts: they are in
                # its `present`, so no view of it is named; counted in `blind_frames` instead.
                losses += [(fr.frame_id, k, "edge", "no features") for k in fr.missing if k not in fr.present]
                counts["blind_frames"] = counts.get("blind_frames", 0) + fr.blind
            counts[f"camera_bytes_{exit_name}"] = counts.get(f"camera_bytes_{exit_name}", 0) + sent
        blind = [fr.frame_id for fr, _ in done if fr.requested and fr.blind]
        if losses or blind:
            self.stats.features_missing += len(losses)
            self._missing_frames += len({f for f, *_ in losses})
            self._blind_frames += len(blind)
            if self._missing_log():  # one line per period, with its counts
                example = (f"e.g. frame {losses[0][0]} camera {losses[0][1]}" if losses
                           else f"e.g. frame {blind[0]}")
                log.warning("site %r: %d frames decided without the features of some cameras and %d answered from "
                            "the cameras' summaries alone, none of their features having come (asked; no answer "
                            "stored here within %d ms: a camera down or its features expired, or its answer held in "
                            "a dead aggregator's session) since the last such line, %s; %d cameras' features missing "
                            "in all", site, self._missing_frames, self._blind_frames, self.cfg.request_deadline_ms,
                            example, self.stats.features_missing)
                self._missing_frames = self._blind_frames = 0
            if losses:
                self.store.record_losses(losses, counter="features_missing")
        self.store.count_many(counts)

    def _escalation(self, fr: Frame, fused: torch.Tensor, edge_entropy: float, edge_pred: int) -> bytes:
        dtype = self.cfg.escalation_dtype
        if dtype == "same":  # the cameras' dtype (a frame none of whose features came: exact)
            dtype = fr.observations[0].features.dtype if fr.observations else "float32"
        return Escalation(self.cfg.site, fr.frame_id, fr.present, fr.captured_at, FeatureTensor.quantize(fused, dtype),
                          edge_entropy, edge_pred, fr.label).encode()

    def escalate(self, items: list[tuple[Frame, bytes]], stop: threading.Event) -> list[Frame]:
        """Hand frames to the cloud; while the stream is full (the cloud is behind) wait with
        capped backoff, leases extended, nothing trimmed. Returns the frames this call escalated."""
        assert self.store is not None
        site, backoff = self.cfg.site, Backoff(first_s=0.005, cap_s=1.0)
        added_frames: list[Frame] = []
        while items:
            waiting = []
            for (fr, raw), added in zip(items, self.store.escalate([(fr.frame_id, raw) for fr, raw in items])):
                if added > 0:
                    self.stats.decided["cloud"] += 1
                    self.stats.escalated_bytes += len(raw)
                    added_frames.append(fr)
                elif added < 0:
                    self.stats.escalation_conflicts += 1
                    log.info("site %r frame %d: already escalated or decided (lease taken over); not escalated "
                             "twice", site, fr.frame_id)
                    self.store.count("escalation_conflicts")
                else:
                    waiting.append((fr, raw))
            items = waiting
            if items:
                self.stats.backpressure_waits += 1
                if self.stats.backpressure_waits % 100 == 1:
                    log.warning("site %r: escalation stream full (%d entries); %d frames wait for the cloud", site,
                                self.cfg.escalation_maxlen, len(items))
                self.watchdog.tick()  # waiting on the cloud is progress of a kind: the loop is not stuck
                if stop.wait(backoff.next()):
                    raise EscalationError(site, items[0][0].frame_id, f"stopped while {len(items)} frames waited "
                                          "for room in the escalation stream (their leases expire and another "
                                          "aggregator takes them over)")
        return added_frames


def _no_shed() -> dict:
    """Shed notices noted and not yet logged (`Aggregator._note_shed`): none."""
    return {"views": 0, "named": 0, "refused": 0, "cameras": set(), "why": set(), "lo": float("inf"),
            "hi": float("-inf")}


def site_lag(lags: list[tuple[int, float]]) -> float:
    """The delay (ms) a flow status reports from (camera, delay) pairs: the median over the cameras
    of each camera's median, so that one camera sending many messages (a flood of stale ones, a
    burst after a reconnect) weighs as one camera."""
    by_camera: dict[int, list[float]] = {}
    for camera, ms in lags:
        by_camera.setdefault(camera, []).append(ms)
    return statistics.median(statistics.median(v) for v in by_camera.values())


def _ids(frame_ids: list[int], most: int = 4) -> str:
    """Frame ids as runs, "208..251, 300", the first `most` runs and how many more."""
    runs: list[list[int]] = []
    for f in sorted(frame_ids):
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    text = ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more runs" if len(runs) > most else "")


# --- CLI ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(EdgeConfig, args)
    if printed(cfg, args):
        return 0
    if args.check:
        return check_alive(cfg.redis_url, cfg.site, "edge", cfg.service_id or None)
    set_threads(cfg.threads)
    edge = load_edge(cfg.checkpoint)
    if cfg.t1 is not None and not edge.cfg.has_camera_classifiers:
        log.warning("edge: --t1 %s is ignored: %s is a %s network, without camera classifiers and so without exit 1",
                    cfg.t1, cfg.checkpoint, edge.cfg.mode)
    t1, t2 = thresholds(cfg.checkpoint, edge.cfg, cfg.t1, cfg.t2)
    serve(Aggregator(cfg, edge, t1, t2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `edge` to the `ada-ddnn` parser."""
    add_command(subparsers, "edge", EdgeConfig, main, help="edge aggregator: assemble frames, exits 1 and 2, escalate "
                "the rest", description=__doc__, check="exit 0 if an aggregator of the site is alive, else 1")
