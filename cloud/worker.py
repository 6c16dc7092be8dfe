"""The cloud worker: answers the frames the edge escalates.

    ada-ddnn cloud --checkpoint models/ada.safetensors --batch 64 --wait-ms 10
    ada-ddnn cloud --check                       # 0 if a worker of the site is alive

Reads `ada:{site}:escalations` as a member of the consumer group "cloud" (several workers
split the stream), batches up to --batch entries or --wait-ms, runs the cloud block (on the
GPU when there is one), records each result once in `ada:{site}:results`, publishes it on
`ada/{site}/results`, and only then XACKs (and XDELs, so that the stream's length is the
edge's backpressure signal). On start and every --claim-interval-s it XAUTOCLAIMs entries that
a dead worker left pending for longer than --claim-idle-ms.
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
from pipeline.transport.mqtt_client import mqtt_client
from pipeline.transport.redis_client import Heartbeat, check_alive, redis_client
from pipeline.transport.results_sink import PUBLISH_TIMEOUT_S, RECORD_RESULT, add_dead_letter, record_and_publish
from pipeline.transport.service import BrokerRoleConfig, BrokerService, serve, service_id
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch < 1 or self.wait_ms < 0 or self.claim_idle_ms < 1:
            raise ValueError("need batch >= 1, wait_ms >= 0 and claim_idle_ms >= 1")


@dataclass
class CloudStats:
    entries: int = 0
    answered: int = 0
    reclaimed: int = 0
    deadletter: int = 0
    batches: int = 0


class Worker(BrokerService):
    role = "cloud"

    def __init__(self, cfg: CloudConfig, model: CloudModule) -> None:
        super().__init__(cfg.service_id or service_id("cloud"))
        self.device = resolve_device(cfg.device)
        self.cfg, self.model = cfg, model.to(self.device).eval()
        self.stats = CloudStats()
        self.stream = names.escalations_stream(cfg.site)

    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        self._record = self.redis.register_script(RECORD_RESULT)
        try:
            self.redis.xgroup_create(self.stream, cfg.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self.heartbeat = Heartbeat(self.redis, cfg.site, "cloud", self.sid, cfg.heartbeat_s,
                                   lambda: {"answered": self.stats.answered}).start()
        self.mqtt = mqtt_client(cfg.mqtt_url, self.sid)
        log.info("cloud %s: site %r, group %r, batch %d / %d ms on %s", self.sid, cfg.site, cfg.group, cfg.batch,
                 cfg.wait_ms, self.device)

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        next_claim = time.monotonic()  # reclaim first: entries a dead worker left behind
        while not stop.is_set():
            if time.monotonic() >= next_claim:
                self.process(self.autoclaim(), reclaimed=True)
                next_claim = time.monotonic() + self.cfg.claim_interval_s
            batch = self.read_batch()
            if batch:
                self.process(batch)

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
        """Entries pending longer than claim_idle_ms at any consumer, now ours."""
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
        if out:
            self.stats.reclaimed += len(out)
            log.warning("cloud %s: reclaimed %d escalations left pending by dead workers", self.sid, len(out))
        return out

    def process(self, entries: list[tuple[bytes, dict]], reclaimed: bool = False) -> None:
        if not entries:
            return
        r = self.redis
        assert r is not None
        self.stats.entries += len(entries)
        good: list[tuple[bytes, Escalation]] = []
        done: list[bytes] = []
        for entry_id, fields in entries:
            try:
                esc = Escalation.decode(fields.get(b"msg", b""))
                if esc.site != self.cfg.site or esc.features.shape != (self.model.cfg.fused_channels,
                                                                       *self.model.cfg.wire_shape[1:]):
                    raise CloudError(self.cfg.site, esc.frame_id, f"escalation of site {esc.site!r} with features "
                                                                  f"{esc.features.shape} does not fit this network")
                good.append((entry_id, esc))
            except (MessageError, CloudError) as err:
                self.dead_letter(entry_id, fields.get(b"msg", b""), str(err))
                done.append(entry_id)
        infos = []
        if good:
            try:
                decisions = self.answer([e for _, e in good])
            except (RuntimeError, ValueError) as err:  # per-message boundary
                for entry_id, esc in good:
                    self.dead_letter(entry_id, b"", f"frame {esc.frame_id}: cloud failed: {err}")
                    done.append(entry_id)
                decisions = []
            for (entry_id, _), dec in zip(good, decisions):
                info = record_and_publish(r, self._record, self.mqtt, dec, self.cfg.decided_ttl_s * 1000,
                                          self.cfg.results_maxlen, republish=reclaimed)
                if info is not None:
                    infos.append(info)
                done.append(entry_id)
            self.stats.answered += len(decisions)
            self.stats.batches += 1
        for info in infos:  # acknowledge upstream only what the broker has acknowledged
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        with r.pipeline(transaction=True) as p:
            p.xack(self.stream, self.cfg.group, *done)
            p.xdel(self.stream, *done)
            p.execute()

    @torch.no_grad()
    def answer(self, escs: list[Escalation]) -> list[Decision]:
        fused = torch.stack([e.features.to_tensor() for e in escs]).to(self.device)
        logits = forward_rows(self.model, fused).float().cpu()
        entropy, pred = normalized_entropy(logits), logits.argmax(-1)
        now = time.time()
        return [Decision(e.site, e.frame_id, "cloud", int(pred[i]), float(entropy[i]), None, e.present, e.captured_at,
                         now, self.sid, e.label) for i, e in enumerate(escs)]

    def dead_letter(self, entry_id: bytes, payload: bytes, reason: str) -> None:
        self.stats.deadletter += 1
        log.warning("site %r: escalation %s to the dead letters: %s", self.cfg.site, entry_id, reason)
        assert self.redis is not None
        add_dead_letter(self.redis, self.cfg.site, f"{self.stream} {entry_id!r}", payload, reason, self.sid)


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
