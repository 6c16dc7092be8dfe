"""The cloud worker: answers the frames the edge escalates.

    ada-ddnn cloud --checkpoint models/ada.safetensors --batch 64 --wait-ms 10
    ada-ddnn cloud --check                       # 0 if a worker of the site is alive

Reads `ada:{site}:escalations` as a member of the consumer group "cloud" (several workers
split the stream), batches up to --batch entries or --wait-ms, runs the cloud block (on the
GPU when there is one), records each result once in `ada:{site}:results` (one pipelined round
trip a batch), publishes it on `ada/{site}/results` (tracked by PUBACK, not waited on: paho
keeps it across a broker restart) and then XACKs and XDELs the entries (so that the stream's
length is the edge's backpressure signal). On start and every --claim-interval-s it
XAUTOCLAIMs entries that a dead worker left pending for longer than --claim-idle-ms; one
delivered more than --max-deliveries times goes to the dead letters.

A batch that fails is answered entry by entry, so one bad escalation sinks only itself. A Redis
outage is retried with capped backoff; a consumer group that vanished (Redis restarted without
persistence) is created again and the loss is logged.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import redis
import torch

from cloud.cloud_net import CloudModule, load_cloud
from pipeline.compute import resolve_device, set_threads
from pipeline.entropy import normalized_entropy
from pipeline.errors import CloudError, MessageError
from pipeline.layers import forward_rows
from pipeline.settings import add_command, config_from_args, printed
from pipeline.transport.mqtt_client import MqttClient
from pipeline.transport.redis_client import Heartbeat, check_alive, redis_client
from pipeline.transport.results_sink import RECORD_RESULT, add_dead_letters, record_results
from pipeline.transport.service import REDIS_DOWN, Backoff, BrokerRoleConfig, BrokerService, serve, service_id
from pipeline.wire import names
from pipeline.wire.messages import Decision, Escalation

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 200  # longest XREADGROUP block while idle, so a stop request is seen quickly


@dataclass(frozen=True)
class CloudConfig(BrokerRoleConfig):
    """One cloud worker (site, brokers and checkpoint as in `BrokerRoleConfig`)."""

    batch: int = 64  # escalations per forward pass at most
    wait_ms: int = 10  # after the first entry of a batch, wait at most this long (ms) for more
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default
    claim_idle_ms: int = 30_000  # an entry pending this long (ms) belongs to a dead worker and is reclaimed
    claim_interval_s: float = 5.0  # how often (s) to look for such entries
    decided_ttl_s: int = 3600  # result markers: how long (s) a frame refuses a second result
    results_maxlen: int = 1_000_000  # results kept in the results stream (approximate trim)
    service_id: str = ""  # consumer name; "" = generated
    group: str = names.CLOUD_GROUP  # Redis consumer group the workers share
    max_deliveries: int = 5  # an escalation reclaimed after this many deliveries goes to the dead letters

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch < 1 or self.wait_ms < 0 or self.claim_idle_ms < 1 or self.max_deliveries < 1:
            raise ValueError("need batch >= 1, wait_ms >= 0, claim_idle_ms >= 1 and max_deliveries >= 1")
        if not self.claim_interval_s > 0 or self.decided_ttl_s < 1 or self.results_maxlen < 1:
            raise ValueError("need claim_interval_s > 0, decided_ttl_s >= 1 and results_maxlen >= 1")


@dataclass
class CloudStats:
    entries: int = 0
    answered: int = 0
    reclaimed: int = 0
    deadletter: int = 0
    batches: int = 0
    isolated: int = 0  # batches that failed whole and were answered entry by entry
    redis_outages: int = 0  # loop turns that met Redis down (each retried after a backoff)
    groups_recreated: int = 0  # the consumer group was gone (Redis restarted without persistence)


class Worker(BrokerService):
    role = "cloud"

    def __init__(self, cfg: CloudConfig, model: CloudModule) -> None:
        super().__init__(cfg.service_id or service_id("cloud"))
        self.device = resolve_device(cfg.device)
        self.cfg, self.model = cfg, model.to(self.device).eval()
        self.stats = CloudStats()
        self.stream = names.escalations_stream(cfg.site)
        self.fused_shape = (model.cfg.fused_channels, *model.cfg.wire_shape[1:])

    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        self._record = self.redis.register_script(RECORD_RESULT)
        self.redis.script_load(RECORD_RESULT)  # loaded now, so that a NOSCRIPT later means Redis restarted
        self.ensure_group()
        self.heartbeat = Heartbeat(self.redis, cfg.site, "cloud", self.sid, cfg.heartbeat_s,
                                   lambda: {"answered": self.stats.answered, "loop_age_s": round(self.watchdog.age(), 3)},
                                   self.healthy).start()
        self.mqtt = MqttClient(cfg.mqtt_url, self.sid).connect()
        self.start_watchdog()
        log.info("cloud %s: site %r, group %r, batch %d / %d ms on %s", self.sid, cfg.site, cfg.group, cfg.batch,
                 cfg.wait_ms, self.device)

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        assert self.redis is not None
        try:
            self.redis.xgroup_create(self.stream, self.cfg.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        next_claim = time.monotonic()  # reclaim first: entries a dead worker left behind
        backoff = Backoff()
        while not stop.is_set():
            self.watchdog.tick()
            try:
                if time.monotonic() >= next_claim:
                    self.process(self.autoclaim(), reclaimed=True)
                    next_claim = time.monotonic() + self.cfg.claim_interval_s
                batch = self.read_batch()
                if batch:
                    self.process(batch)
                backoff.reset()
            except REDIS_DOWN as err:
                self.stats.redis_outages += 1
                delay = backoff.next()
                log.warning("cloud %s: Redis unavailable (%s); retrying in %.1f s", self.sid, err, delay)
                stop.wait(delay)
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                self.stats.groups_recreated += 1
                log.error("cloud %s: the consumer group %r of %s is gone (Redis restarted without persistence?); "
                          "creating it again: escalations that were in the stream are lost with it", self.sid,
                          self.cfg.group, self.stream)
                self.ensure_group()

    def read_batch(self) -> list[tuple[bytes, dict]]:
        """Up to `batch` new entries: block for the first, then at most `wait_ms` for the rest."""
        cfg, r = self.cfg, self.redis
        assert r is not None
        out: list[tuple[bytes, dict]] = []
        first_at = None
        while len(out) < cfg.batch:
            if first_at is None:
                block = IDLE_BLOCK_MS
            else:
                left = cfg.wait_ms - (time.monotonic() - first_at) * 1000
                if left < 1:
                    break
                block = int(left)
            resp = r.xreadgroup(cfg.group, self.sid, {self.stream: ">"}, count=cfg.batch - len(out), block=block)
            if not resp:
                if first_at is None:
                    return out
                break
            for _, entries in resp:
                out.extend(entries)
            if first_at is None:
                first_at = time.monotonic()
        return out

    def autoclaim(self) -> list[tuple[bytes, dict]]:
        """Entries pending longer than claim_idle_ms at any consumer, now ours. An entry already
        delivered `max_deliveries` times (it keeps killing workers) goes to the dead letters."""
        r, cfg = self.redis, self.cfg
        assert r is not None
        out: list[tuple[bytes, dict]] = []
        start = "0-0"
        while True:
            resp = r.xautoclaim(self.stream, cfg.group, self.sid, cfg.claim_idle_ms, start_id=start, count=cfg.batch)
            start, entries = resp[0], resp[1]
            out.extend(e for e in entries if e[1])  # deleted entries come back empty
            if start in (b"0-0", "0-0") or len(out) >= 4 * cfg.batch:
                break
        if not out:
            return out
        with r.pipeline(transaction=False) as p:
            for entry_id, _ in out:
                p.xpending_range(self.stream, cfg.group, min=entry_id, max=entry_id, count=1)
            pending = p.execute()
        keep, poison = [], []
        for (entry_id, fields), info in zip(out, pending):
            times = int(info[0]["times_delivered"]) if info else 0
            (poison if times > cfg.max_deliveries else keep).append((entry_id, fields, times))
        if poison:
            self.finish([entry_id for entry_id, _, _ in poison],
                        [(entry_id, fields.get(b"msg", b""), f"delivered {times} times without an answer (it kills "
                          f"or stalls every worker that takes it); given up") for entry_id, fields, times in poison])
        self.stats.reclaimed += len(keep)
        if keep:
            log.warning("cloud %s: reclaimed %d escalations left pending by dead workers", self.sid, len(keep))
        return [(entry_id, fields) for entry_id, fields, _ in keep]

    def process(self, entries: list[tuple[bytes, dict]], reclaimed: bool = False) -> None:
        """Answer a batch: record each result once, publish it, then XACK + XDEL every entry (the
        stream's length is the edge's backpressure signal). An entry that cannot be answered goes
        to the dead letters alone."""
        if not entries:
            return
        assert self.redis is not None and self.mqtt is not None
        self.stats.entries += len(entries)
        good: list[tuple[bytes, Escalation]] = []
        letters: list[tuple[bytes, bytes, str]] = []
        for entry_id, fields in entries:
            try:
                esc = Escalation.decode(fields.get(b"msg", b""))
                if esc.site != self.cfg.site or esc.features.shape != self.fused_shape:
                    raise CloudError(self.cfg.site, esc.frame_id, f"escalation of site {esc.site!r} with features "
                                                                  f"{esc.features.shape} does not fit this network")
                good.append((entry_id, esc))
            except (MessageError, CloudError) as err:
                letters.append((entry_id, fields.get(b"msg", b""), str(err)))
            except Exception as err:  # noqa: BLE001 - the per-message boundary: no entry stops the worker
                log.exception("cloud %s: unexpected error on escalation %s", self.sid, entry_id)
                letters.append((entry_id, fields.get(b"msg", b""), f"unexpected {type(err).__name__}: {err}"))
        answered = self.answer_isolated(good, letters)
        decisions = [(dec, dec.encode()) for _, dec in answered]
        firsts = record_results(self.redis, self._record, decisions, self.cfg.decided_ttl_s * 1000,
                                self.cfg.results_maxlen)
        for (dec, raw), first in zip(decisions, firsts):
            if first or reclaimed:  # a reclaimed entry's result may have been recorded but never published
                self.mqtt.publish(names.results_topic(dec.site), raw)
        self.stats.answered += len(answered)
        self.stats.batches += 1
        self.finish([entry_id for entry_id, _ in answered], letters)

    def answer_isolated(self, good: list[tuple[bytes, Escalation]],
                        letters: list[tuple[bytes, bytes, str]]) -> list[tuple[bytes, Decision]]:
        """Answers for a batch; when the batch fails, entry by entry, so that one bad escalation
        takes none of its batch-mates with it (those that fail alone join `letters`)."""
        if not good:
            return []
        try:
            return list(zip([e for e, _ in good], self.answer([esc for _, esc in good])))
        except (RuntimeError, ValueError) as err:
            self.stats.isolated += 1
            log.warning("cloud %s: a batch of %d failed (%s); answering its entries one by one", self.sid, len(good),
                        err)
        out = []
        for entry_id, esc in good:
            try:
                out.append((entry_id, self.answer([esc])[0]))
            except (RuntimeError, ValueError) as err:  # per-message boundary
                letters.append((entry_id, esc.encode(), f"site {esc.site!r} frame {esc.frame_id}: cloud failed: {err}"))
        return out

    @torch.no_grad()
    def answer(self, escs: list[Escalation]) -> list[Decision]:
        """The cloud block on a batch; ValueError when a row's numbers are not finite."""
        fused = torch.stack([e.features.to_tensor() for e in escs]).to(self.device)
        logits = forward_rows(self.model, fused).float().cpu()
        bad = [e.frame_id for e, ok in zip(escs, torch.isfinite(logits).all(dim=1)) if not ok]
        if bad:
            raise ValueError(f"the cloud block's output is not finite for frames {bad}")
        entropy, pred = normalized_entropy(logits), logits.argmax(-1)
        now = time.time()
        return [Decision(e.site, e.frame_id, "cloud", int(pred[i]), float(entropy[i]), None, e.present, e.captured_at,
                         now, self.sid, e.label) for i, e in enumerate(escs)]

    def finish(self, done: list[bytes], letters: list[tuple[bytes, bytes, str]]) -> None:
        """Dead-letter `letters` (entry id, payload, reason), then XACK + XDEL them and `done`."""
        assert self.redis is not None
        if letters:
            self.stats.deadletter += len(letters)
            for entry_id, _, reason in letters[:5]:
                log.warning("site %r: escalation %s to the dead letters: %s", self.cfg.site, entry_id, reason)
            add_dead_letters(self.redis, self.cfg.site, [(f"{self.stream} {entry_id!r}", payload, reason)
                                                          for entry_id, payload, reason in letters], self.sid)
        ids = done + [entry_id for entry_id, _, _ in letters]
        if ids:
            with self.redis.pipeline(transaction=True) as p:
                p.xack(self.stream, self.cfg.group, *ids)
                p.xdel(self.stream, *ids)
                p.execute()


# --- CLI ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(CloudConfig, args)
    if printed(cfg, args):
        return 0
    if args.check:
        return check_alive(cfg.redis_url, cfg.site, "cloud", cfg.service_id or None)
    set_threads(cfg.threads)
    serve(Worker(cfg, load_cloud(cfg.checkpoint)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `cloud` to the `ada-ddnn` parser."""
    add_command(subparsers, "cloud", CloudConfig, main, help="cloud worker: answer escalated frames in batches",
                description=__doc__, check="exit 0 if a cloud worker of the site is alive, else 1")
