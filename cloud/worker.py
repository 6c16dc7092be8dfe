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

One worker can serve many sites (one pool of cloud workers for many sites):

    ada-ddnn cloud --sites a,b,c                 # these sites' escalation streams
    ada-ddnn cloud --sites '*'                   # every site an edge announced (ada:sites)

It reads each site's stream with the consumer group, fairly: each round visits every site
once, in a rotating order, taking at most its share of a batch (--batch / number of sites), so a
site with a long backlog cannot starve the others; one forward pass answers the entries of all
sites. Recording, acknowledging, dead letters, --max-deliveries, NOGROUP and XAUTOCLAIM stay per
site, and every pipeline touches one site's keys. It beats a heartbeat at each site it serves.
Each site's results go to --mqtt-url, or to the site's own broker named in --site-mqtt.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from redis.cluster import RedisCluster

from cloud.cloud_net import CloudModule, load_cloud
from pipeline.compute import resolve_device, set_threads
from pipeline.entropy import normalized_entropy
from pipeline.errors import CloudError, ConnectError, MessageError
from pipeline.layers import forward_rows, warm_up
from pipeline.settings import add_command, config_from_args, printed
from pipeline.throttle import Throttle
from pipeline.transport.metrics import Sample, sample
from pipeline.transport.mqtt_client import MqttClient
from pipeline.transport.redis_client import CHECK_TIMEOUT_S, Heartbeat, alive, check_alive, group_gone, redis_client
from pipeline.transport.results_sink import RECORD_RESULT, add_dead_letters, record_results
from pipeline.transport.service import REDIS_DOWN, Backoff, BrokerRoleConfig, BrokerService, serve, service_id
from pipeline.wire import names
from pipeline.wire.messages import Decision, Escalation

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 200  # longest XREADGROUP block while idle, so a stop request is seen quickly
RETIRE_LOG_S = 60.0  # say at most this often that a site left the registry but still has escalations waiting
SITE_RETRY_S = 5.0  # a site whose keys Redis refuses (WRONGTYPE) is left alone this long; the others go on
ALL_SITES = "*"  # --sites: every site in the registry (`names.sites_key()`)


@dataclass(frozen=True)
class CloudConfig(BrokerRoleConfig):
    """One cloud worker (site, brokers and checkpoint as in `BrokerRoleConfig`)."""

    batch: int = field(default=64, metadata={"min": 1, "max": 10_000})  # escalations per forward pass at most
    wait_ms: int = field(default=10, metadata={"min": 0, "max": 60_000})  # after the first entry of a batch, wait at most this long (ms) for more
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda
    threads: int = field(default=0, metadata={"min": 0})  # torch CPU threads; 0 = torch's default
    claim_idle_ms: int = field(default=30_000, metadata={"min": 1, "max": 86400000})  # an entry pending this long (ms) belongs to a dead worker and is reclaimed
    claim_interval_s: float = field(default=5.0, metadata={"above": 0, "max": 3600})  # how often (s) to look for such entries
    decided_ttl_s: int = field(default=3600, metadata={"min": 1, "max": 31536000})  # result markers: how long (s) a frame refuses a second result
    results_maxlen: int = field(default=1_000_000, metadata={"min": 1, "max": 1_000_000_000})  # results kept in the results stream (approximate trim)
    service_id: str = ""  # consumer name; "" = generated
    group: str = names.CLOUD_GROUP  # Redis consumer group the workers share
    max_deliveries: int = field(default=5, metadata={"min": 1})  # an escalation reclaimed after this many deliveries goes to the dead letters
    sites: str = ""  # the sites this worker serves, comma-separated, or * for every site an edge announced (looked up again every --claim-interval-s); "" = --site alone
    site_mqtt: str = ""  # brokers of their own for some sites' results: site=mqtt://host:port,...; the others' go to --mqtt-url

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.service_id:
            names.check_service_id(self.service_id, "service_id")
        if self.sites != ALL_SITES:
            listed = [one.strip() for one in self.sites.split(",")]
            if self.sites.strip() and not all(listed):
                raise ValueError(f"sites: a comma-separated list of site ids or '*', got {self.sites!r}")
            for one in filter(None, listed):
                names.check_site(one)
        self.mqtt_urls()
        names.check_group(self.group)

    def site_list(self) -> list[str]:
        """The sites named by --sites (none for *), else --site."""
        if self.sites == ALL_SITES:
            return []
        return list(dict.fromkeys(one.strip() for one in self.sites.split(",") if one.strip())) or [self.site]

    def mqtt_urls(self) -> dict[str, str]:
        """--site-mqtt as site -> broker URL."""
        out = {}
        for pair in filter(None, (p.strip() for p in self.site_mqtt.split(","))):
            site, sep, url = pair.partition("=")
            if not sep or not url:
                raise ValueError(f"site_mqtt: {pair!r} is not site=mqtt://host:port")
            out[names.check_site(site)] = url
        return out


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
    redis_errors: int = 0  # loop turns Redis refused otherwise (a key of ours overwritten: WRONGTYPE), retried


class Worker(BrokerService):
    role = "cloud"

    def __init__(self, cfg: CloudConfig, model: CloudModule) -> None:
        super().__init__(cfg.service_id or service_id("cloud"))
        self.device = resolve_device(cfg.device)
        self.cfg, self.model = cfg, model.to(self.device).eval()
        self.stats = CloudStats()
        self.sites: list[str] = []  # served now; with --sites '*' it grows as edges announce sites
        self.fused_shape = (model.cfg.fused_channels, *model.cfg.wire_shape[1:])
        self._turn = 0  # which site a round of reads starts at (rotates)
        self._site_mqtt: dict[str, MqttClient] = {}  # brokers of their own (--site-mqtt), by URL
        self._retire_log = Throttle(RETIRE_LOG_S)  # by site: one that left the registry, still being drained
        # Sites whose entries pending at this consumer are to be read at the next reclaim pass, and why:
        # a previous run's (same --service-id), or those Redis refused to record (`_site_error`).
        self._own_pending: dict[str, str] = {}
        self._broken: dict[str, float] = {}  # site -> monotonic time until which its keys are not tried (SITE_RETRY_S)
        log.info("cloud %s: cloud block warmed up in %.2f s on %s", self.sid,
                 warm_up(self.model, torch.zeros(2, *self.fused_shape, device=self.device)), self.device)

    def connect(self) -> None:
        cfg = self.cfg
        self.redis = redis_client(cfg.redis_url)
        self._record = self.redis.register_script(RECORD_RESULT)
        self.redis.script_load(RECORD_RESULT)  # loaded now, so that a NOSCRIPT later means Redis restarted
        # Clean sessions that only publish: a client id of this process's own, so that no other process
        # given the same --service-id (an edge, a worker of another site) takes this connection over.
        cid = f"cloud-{self.sid}-{uuid.uuid4().hex[:6]}"
        self.mqtt = MqttClient(cfg.mqtt_url, cid).connect()
        for url in dict.fromkeys(cfg.mqtt_urls().values()):
            self._site_mqtt[url] = MqttClient(url, f"{cid}-{len(self._site_mqtt)}").connect()
        self.update_sites()
        self.start_watchdog()
        log.info("cloud %s: site %r, group %r, batch %d / %d ms on %s", self.sid, ",".join(self.sites) or cfg.sites,
                 cfg.group, cfg.batch, cfg.wait_ms, self.device)

    def update_sites(self) -> None:
        """Serve the configured sites (with --sites '*', every site in the registry): each new one
        gets its consumer group and a heartbeat."""
        assert self.redis is not None
        if self.cfg.sites == ALL_SITES:
            found = sorted(x.decode() if isinstance(x, bytes) else x for x in self.redis.smembers(names.sites_key()))
            wanted = [x for x in found if names.SITE_RE.match(x)]
            for site in [x for x in self.sites if x not in wanted]:
                self.retire(site)
        else:
            wanted = self.cfg.site_list()
        for site in wanted:
            if site in self.sites:
                continue
            if self.cfg.service_id:
                self._own_pending[site] = "this worker's previous run left pending"
            try:
                self.ensure_group(site)
            except redis.ResponseError as err:  # served all the same: its reads retry, and make the group
                self._site_error(site, err)
            self.sites.append(site)
            if self.heartbeat is None:
                self.heartbeat = Heartbeat(self.redis, site, "cloud", self.sid, self.cfg.heartbeat_s,
                                           lambda: {"answered": self.stats.answered, "sites": len(self.sites),
                                                    "loop_age_s": round(self.watchdog.age(), 3)},
                                           self.healthy).start()
            else:
                self.heartbeat.add_site(site)
            if self.cfg.sites == ALL_SITES:
                log.info("cloud %s: now serving site %r (%d sites)", self.sid, site, len(self.sites))

    def retire(self, site: str) -> None:
        """--sites '*': stop serving a site that left the registry (removed by hand, or by a
        finished replay with its keys) once no aggregator of it is alive (each announces its site
        again every ANNOUNCE_S) and nothing of it waits for this group: its stream gone, or every
        entry delivered and acknowledged (until then it is served as before). Its heartbeat goes
        with it; an edge that announces the site again brings it back."""
        if site not in self.sites:
            return
        if not self._drained(site):  # (first: one XINFO, where `alive` scans the keyspace)
            if self._retire_log(site):
                log.info("cloud %s: site %r left the registry (%s) with escalations still waiting: serving it until "
                         "they are answered", self.sid, site, names.sites_key())
            return
        if alive(self.redis, site, "edge"):  # removed by hand while it runs: its edge announces it again
            if self._retire_log(site):
                log.warning("cloud %s: site %r left the registry (%s) but an aggregator of it is alive: still served",
                            self.sid, site, names.sites_key())
            return
        self.sites.remove(site)
        if self.heartbeat is not None:
            self.heartbeat.remove_site(site)
        log.info("cloud %s: site %r left the registry (%s): no longer served (%d sites)", self.sid, site,
                 names.sites_key(), len(self.sites))

    def _drained(self, site: str) -> bool:
        """Nothing of `site`'s stream waits for this worker's group: no stream (or no group), no
        entry pending, none not yet delivered."""
        assert self.redis is not None
        stream = names.escalations_stream(site)
        try:
            groups = self.redis.xinfo_groups(stream)
        except redis.ResponseError:  # no such key: the stream is gone
            return True
        mine = next((g for g in groups if _text(g["name"]) == self.cfg.group), None)
        if mine is None:
            return True
        if mine["pending"]:
            return False
        if mine.get("lag") is not None:  # Redis 7; None where it cannot tell (entries deleted)
            return mine["lag"] == 0
        return _text(mine["last-delivered-id"]) == _text(self.redis.xinfo_stream(stream)["last-generated-id"])

    def ensure_group(self, site: str) -> None:
        """Create the site's consumer group (and its stream) unless they exist."""
        assert self.redis is not None
        try:
            self.redis.xgroup_create(names.escalations_stream(site), self.cfg.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def close(self) -> None:
        for client in self._site_mqtt.values():
            client.close()
        self._site_mqtt = {}
        super().close()

    def metric_samples(self) -> list[Sample]:
        """Counters over every site this worker serves (site "all"); backlogs per site."""
        st = self.stats
        out = [sample("ada_frames_decided", st.answered, site="all",
                       exit="cloud"),
               sample("ada_escalations_read", st.entries, site="all"),
               sample("ada_escalations_reclaimed", st.reclaimed, site="all"),
               sample("ada_dead_letters", st.deadletter, site="all"),
               sample("ada_cloud_batches", st.batches, site="all"),
               sample("ada_redis_outages", st.redis_outages, site="all")]
        if self.mqtt is not None:
            out.append(sample("ada_mqtt_reconnects", self.mqtt.reconnects, site="all"))
        r = self.redis
        for site in list(self.sites) if r is not None else []:
            try:
                waiting = r.xlen(names.escalations_stream(site))
                pending = r.xpending(names.escalations_stream(site), self.cfg.group)["pending"]
            except (redis.ResponseError, *REDIS_DOWN):
                continue  # no group yet, or Redis away: this scrape goes without the site's backlog
            out.append(sample("ada_backlog", waiting, site=site, queue="escalations"))
            out.append(sample("ada_backlog", pending, site=site, queue="cloud_pending"))
        return out

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        next_claim = time.monotonic()  # reclaim first: entries a dead worker left behind
        backoff = Backoff()
        while not stop.is_set():
            self.watchdog.tick()
            try:
                if time.monotonic() >= next_claim:
                    self.update_sites()
                    self.process(self.autoclaim(), reclaimed=True)
                    next_claim = time.monotonic() + self.cfg.claim_interval_s
                batch = self.read_batch()
                if batch:
                    self.process(batch)
                elif not self.active_sites():
                    stop.wait(IDLE_BLOCK_MS / 1000)  # no site announced yet, or none whose keys Redis takes
                backoff.reset()
            except REDIS_DOWN as err:
                self.stats.redis_outages += 1
                delay = backoff.next()
                log.warning("cloud %s: Redis unavailable (%s); retrying in %.1f s", self.sid, err, delay)
                stop.wait(delay)
            except redis.ResponseError as err:  # NOGROUP where no read expected it: every group checked
                if not group_gone(err):  # e.g. WRONGTYPE: a key of ours overwritten; an operator's to mend
                    self.stats.redis_errors += 1
                    delay = backoff.next()
                    log.error("cloud %s: Redis refused a command: %s; retrying in %.1f s", self.sid, err, delay)
                    stop.wait(delay)
                    continue
                for site in list(self.sites):
                    self._nogroup(site, err)

    def _site_error(self, site: str, err: redis.ResponseError) -> None:
        """Redis refused a command on one site's keys (WRONGTYPE: a key of its name overwritten,
        an operator's to mend): that site is left alone for SITE_RETRY_S, its escalations wait in
        its stream (those read stay pending, reclaimed later); every other site is served on."""
        self.stats.redis_errors += 1
        self._broken[site] = time.monotonic() + SITE_RETRY_S
        self._own_pending.setdefault(site, "left pending when Redis refused this site's keys")  # read, answered, kept
        log.error("cloud %s: site %r: Redis refused a command on its keys (%s); its escalations wait in %s, "
                  "retried in %.0f s; other sites go on", self.sid, site, err, names.escalations_stream(site),
                  SITE_RETRY_S)

    def active_sites(self) -> list[str]:
        """The sites served now: all but those whose keys Redis refused less than SITE_RETRY_S ago."""
        now = time.monotonic()
        for site in [x for x, until in self._broken.items() if until <= now]:
            del self._broken[site]
        return [x for x in self.sites if x not in self._broken]

    def _site_failed(self, site: str, err: redis.ResponseError) -> None:
        """A ResponseError from one site's keys: its group made again (NOGROUP), else `_site_error`."""
        if group_gone(err):
            self._nogroup(site, err)
        else:
            self._site_error(site, err)

    def _nogroup(self, site: str, err: redis.ResponseError) -> None:
        """A consumer group that vanished (Redis restarted without persistence, the stream deleted
        under a blocked read) is made again; with --sites '*', unless the site left the registry
        (its keys removed with it): then it is retired, not brought back."""
        if not group_gone(err):
            raise err
        assert self.redis is not None
        if self.cfg.sites == ALL_SITES and not self.redis.sismember(names.sites_key(), site):
            self.retire(site)
            if site not in self.sites:
                return
        self.stats.groups_recreated += 1
        log.error("cloud %s: the consumer group %r of %s is gone (%s: Redis restarted without persistence, or the "
                  "stream deleted?); creating it again: escalations that were in the stream are lost with it",
                  self.sid, self.cfg.group, names.escalations_stream(site), str(err).split(" ")[0])
        self.ensure_group(site)

    def _read(self, site: str, count: int, block: int | None) -> list[tuple[str, bytes, dict]]:
        assert self.redis is not None
        try:
            resp = self.redis.xreadgroup(self.cfg.group, self.sid, {names.escalations_stream(site): ">"}, count=count,
                                         block=block)
        except redis.ResponseError as err:
            self._site_failed(site, err)
            return []
        return [(site, entry_id, fields) for _, entries in resp or [] for entry_id, fields in entries]

    def _read_all(self, sites: list[str], count: int, block: int | None) -> list[tuple[str, bytes, dict]] | None:
        """Several sites on one Redis: one XREADGROUP over every site's stream at once, up to
        `count` entries each, blocking for `block` ms while idle (None: not at all). A round of
        per-site reads cost a round trip a site (with 1 ms blocks, most of a core with a hundred
        sites). None where that cannot be done: a Redis Cluster (the sites' streams live in
        different slots) or a site whose group is missing (the per-site read recreates it)."""
        assert self.redis is not None
        if isinstance(self.redis, RedisCluster):
            return None
        by_stream = {names.escalations_stream(site): site for site in sites}
        try:
            resp = self.redis.xreadgroup(self.cfg.group, self.sid, dict.fromkeys(by_stream, ">"), count=count,
                                         block=block)
        except redis.ResponseError:
            return None
        return [(by_stream[_text(stream)], entry_id, fields)
                for stream, entries in resp or [] for entry_id, fields in entries]

    def _read_round(self, order: list[str], share: int, room: int) -> list[tuple[str, bytes, dict]]:
        """One round over the sites in `order`: at most `share` entries a site and `room` in all,
        without blocking. On one Redis a read covers as many sites as `room` has an entry for
        (the next ones only where those sites had less than that); on a cluster, or where a
        group must be made again, one read a site."""
        out: list[tuple[str, bytes, dict]] = []
        i = 0
        while i < len(order) and len(out) < room:
            left = room - len(out)
            chunk = order[i:i + left]
            entries = self._read_all(chunk, min(share, max(1, left // len(chunk))), None)
            if entries is None:
                for site in order[i:]:
                    if len(out) >= room:
                        break
                    out += self._read(site, min(share, room - len(out)), None)
                return out
            out += entries
            i += len(chunk)
        return out

    def read_batch(self) -> list[tuple[str, bytes, dict]]:
        """Up to `batch` new (site, entry id, fields): rounds over the sites, each taking at most
        its share of the batch per round (one read for all of them on one Redis, one a site on a
        cluster); when a round finds nothing, block: while idle on every site at once for at most
        200 ms (one read, on one Redis; with more sites than `batch`, a burst may bring one entry a
        site), then on one site at a time for at most `wait_ms` for the rest of a batch."""
        cfg, sites = self.cfg, self.active_sites()
        if not sites:
            return []
        share = max(1, -(-cfg.batch // len(sites)))
        out: list[tuple[str, bytes, dict]] = []
        first_at = None
        while len(out) < cfg.batch:
            self._turn = (self._turn + 1) % len(sites)
            order = sites[self._turn:] + sites[:self._turn]
            got = 0
            if len(sites) > 1:
                entries = self._read_round(order, share, cfg.batch - len(out))
                got = len(entries)
                out.extend(entries)
            if got:
                if first_at is None:
                    first_at = time.monotonic()
                elif (time.monotonic() - first_at) * 1000 >= cfg.wait_ms:
                    break
                continue
            if first_at is None:
                count = max(1, (cfg.batch - len(out)) // len(sites))
                if len(sites) > 1 and (entries := self._read_all(order, count, IDLE_BLOCK_MS)) is not None:
                    if not entries:
                        return out
                    out.extend(entries)
                    first_at = time.monotonic()
                    continue
                block = max(1, IDLE_BLOCK_MS // len(sites))
            else:
                left = cfg.wait_ms - (time.monotonic() - first_at) * 1000
                if left < 1:
                    break
                block = int(left) if len(sites) == 1 else max(1, min(int(left), IDLE_BLOCK_MS // len(sites)))
            entries = self._read(order[0], min(share, cfg.batch - len(out)), block)
            if not entries:
                if first_at is None:
                    return out
                break
            out.extend(entries)
            if first_at is None:
                first_at = time.monotonic()
        return out

    def autoclaim(self) -> list[tuple[str, bytes, dict]]:
        """Entries pending longer than claim_idle_ms at any consumer, now ours, from every site.
        An entry already delivered `max_deliveries` times (it keeps killing workers) goes to the
        dead letters."""
        out: list[tuple[str, bytes, dict]] = []
        for site in self.active_sites():
            try:
                out.extend(self._autoclaim(site))
            except redis.ResponseError as err:
                self._site_failed(site, err)
        return out

    def _autoclaim(self, site: str) -> list[tuple[str, bytes, dict]]:
        r, cfg, stream = self.redis, self.cfg, names.escalations_stream(site)
        assert r is not None
        out: list[tuple[bytes, dict]] = []
        own: set[bytes] = set()  # entries pending at this consumer (logged apart from the dead workers')
        if site in self._own_pending:
            # This worker's previous run (same --service-id, so the same consumer) may have died
            # holding entries, or Redis refused to record some: they are ours already, so take them
            # now, not after claim_idle_ms.
            resp = r.xreadgroup(cfg.group, self.sid, {stream: "0"}, count=4 * cfg.batch)
            why = self._own_pending.pop(site)  # read (a Redis outage above leaves it for the next pass)
            out.extend(e for e in (resp[0][1] if resp else []) if e[1])
            own = {entry_id for entry_id, _ in out}
            if out:
                log.warning("cloud %s: site %r: %d escalations %s, answered now", self.sid, site, len(out), why)
        seen, start = {entry_id for entry_id, _ in out}, "0-0"
        while len(out) < 4 * cfg.batch:
            resp = r.xautoclaim(stream, cfg.group, self.sid, cfg.claim_idle_ms, start_id=start, count=cfg.batch)
            start, entries = resp[0], resp[1]
            out.extend(e for e in entries if e[1] and e[0] not in seen)  # deleted entries come back empty
            seen.update(e[0] for e in entries)
            if start in (b"0-0", "0-0"):
                break
        if not out:
            return []
        with r.pipeline(transaction=False) as p:
            for entry_id, _ in out:
                p.xpending_range(stream, cfg.group, min=entry_id, max=entry_id, count=1)
            pending = p.execute()
        keep, poison = [], []
        for (entry_id, fields), info in zip(out, pending):
            times = int(info[0]["times_delivered"]) if info else 0
            (poison if times > cfg.max_deliveries else keep).append((entry_id, fields, times))
        if poison:
            self.finish(site, [entry_id for entry_id, _, _ in poison],
                        [(entry_id, fields.get(b"msg", b""), f"delivered {times} times without an answer (it kills "
                          f"or stalls every worker that takes it); given up") for entry_id, fields, times in poison])
        self.stats.reclaimed += len(keep)
        others = sum(entry_id not in own for entry_id, _, _ in keep)
        if others:
            log.warning("cloud %s: site %r: reclaimed %d escalations left pending by dead workers", self.sid, site,
                        others)
        return [(site, entry_id, fields) for entry_id, fields, _ in keep]

    def process(self, entries: list[tuple[str, bytes, dict]], reclaimed: bool = False) -> None:
        """Answer a batch (of any sites) in one forward pass; then, site by site, record each
        result once, publish it, and XACK + XDEL every entry (the stream's length is the edge's
        backpressure signal). An entry that cannot be answered goes to its site's dead letters alone."""
        if not entries:
            return
        assert self.redis is not None and self.mqtt is not None
        self.stats.entries += len(entries)
        good: list[tuple[tuple[str, bytes], Escalation]] = []
        letters: dict[str, list[tuple[bytes, bytes, str]]] = {}
        for site, entry_id, fields in entries:
            try:
                if b"msg" not in fields:
                    raise MessageError(f"stream entry without a 'msg' field (fields: {sorted(fields)[:8]})")
                esc = Escalation.decode(fields[b"msg"])
                if esc.site != site:
                    raise CloudError(site, esc.frame_id, f"an escalation of site {esc.site!r} in this site's stream")
                if esc.features.shape != self.fused_shape:
                    raise CloudError(site, esc.frame_id, f"escalation with features {esc.features.shape}, this "
                                                         f"network takes {self.fused_shape}")
                self.check_ids(site, esc)
                good.append(((site, entry_id), esc))
            except (MessageError, CloudError) as err:
                letters.setdefault(site, []).append((entry_id, fields.get(b"msg", b""), str(err)))
            except Exception as err:  # noqa: BLE001 - the per-message boundary: no entry stops the worker
                log.exception("cloud %s: unexpected error on escalation %s of site %r", self.sid, entry_id, site)
                letters.setdefault(site, []).append((entry_id, fields.get(b"msg", b""),
                                                     f"unexpected {type(err).__name__}: {err}"))
        isolated: list[tuple[tuple[str, bytes], bytes, str]] = []
        answered = self.answer_isolated(good, isolated)
        for (site, entry_id), payload, reason in isolated:
            letters.setdefault(site, []).append((entry_id, payload, reason))
        by_site: dict[str, list[tuple[bytes, Decision]]] = {}
        for (site, entry_id), dec in answered:
            by_site.setdefault(site, []).append((entry_id, dec))
        unrecorded = 0
        for site in dict.fromkeys([s for s, _, _ in entries]):
            done = by_site.get(site, [])
            decisions = [(dec, dec.encode()) for _, dec in done]
            try:
                firsts = record_results(self.redis, self._record, decisions, self.cfg.decided_ttl_s * 1000,
                                        self.cfg.results_maxlen)
                again = self._ours_already(decisions, firsts) if reclaimed else set()
                for (dec, raw), first in zip(decisions, firsts):
                    # a reclaimed entry's result may have been recorded, never published
                    if first or dec.frame_id in again:
                        self.results_broker(site).publish(names.results_topic(dec.site), raw)
                    if first:
                        self.metrics.observe(site, dec.exit, dec.decided_at - dec.captured_at)
                self.finish(site, [entry_id for entry_id, _ in done], letters.get(site, []))
            except redis.ResponseError as err:  # this site's keys: its entries stay pending (reclaimed later)
                if group_gone(err):
                    raise
                self._site_error(site, err)
                unrecorded += len(done)  # answered again when read again
        self.stats.answered += len(answered) - unrecorded
        self.stats.batches += 1

    def _ours_already(self, decisions: list[tuple[Decision, bytes]], firsts: list[bool]) -> set[int]:
        """Frames of reclaimed entries whose result was recorded before, by the cloud: those the
        edge escalated (it never records a result for a frame it escalated), so the recorded
        result is this same computation, which a worker that died may never have published. A
        frame without the escalation marker got its result elsewhere: publishing ours would
        contradict it."""
        refused = [dec for (dec, _), first in zip(decisions, firsts) if not first]
        if not refused:
            return set()
        with self.redis.pipeline(transaction=False) as p:
            for dec in refused:
                p.exists(names.escalated_key(dec.site, dec.frame_id))
            marked = p.execute()
        return {dec.frame_id for dec, m in zip(refused, marked) if m}

    def check_ids(self, site: str, esc: Escalation) -> None:
        """Refuse an escalation naming what this network has not: a camera id beyond its cameras, or a
        class (the edge's prediction, the label) beyond its classes. The wire's own bounds are the
        protocol's limits; these are the model's, so no such entry becomes a recorded result."""
        cams, classes = self.model.cfg.num_cameras, self.model.cfg.num_classes
        beyond = [c for c in esc.present if c >= cams]
        if beyond:
            raise CloudError(site, esc.frame_id, f"escalation naming cameras {beyond}, this network has {cams}")
        for name, value in (("edge_prediction", esc.edge_prediction), ("label", esc.label)):
            if value is not None and value >= classes:
                raise CloudError(site, esc.frame_id, f"escalation with {name} {value}, this network has {classes} classes")

    def results_broker(self, site: str) -> MqttClient:
        """The MQTT client for `site`'s results: its own broker (--site-mqtt) or --mqtt-url's."""
        url = self.cfg.mqtt_urls().get(site)
        client = self._site_mqtt.get(url) if url else None
        assert self.mqtt is not None
        return client or self.mqtt

    def answer_isolated(self, good: list[tuple[Any, Escalation]],
                        letters: list[tuple[Any, bytes, str]]) -> list[tuple[Any, Decision]]:
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

    def finish(self, site: str, done: list[bytes], letters: list[tuple[bytes, bytes, str]]) -> None:
        """Dead-letter `letters` (entry id, payload, reason) of `site`, then XACK + XDEL them and `done`."""
        assert self.redis is not None
        stream = names.escalations_stream(site)
        if letters:
            self.stats.deadletter += len(letters)
            for entry_id, _, reason in letters[:5]:
                log.warning("site %r: escalation %s to the dead letters: %s", site, _text(entry_id), reason)
            if len(letters) > 5:
                log.warning("site %r: %d more escalations of this batch to the dead letters", site, len(letters) - 5)
            add_dead_letters(self.redis, site, [(f"{stream} {entry_id!r}", payload, reason)
                                                for entry_id, payload, reason in letters], self.sid)
        ids = done + [entry_id for entry_id, _, _ in letters]
        if ids:
            with self.redis.pipeline(transaction=True) as p:
                p.xack(stream, self.cfg.group, *ids)
                p.xdel(stream, *ids)
                p.execute()


# --- CLI ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(CloudConfig, args)
    if printed(cfg, args):
        return 0
    if args.check:  # every site served must have a live worker
        sites = cfg.site_list() or registered_sites(cfg.redis_url)
        return max([check_alive(cfg.redis_url, site, "cloud", cfg.service_id or None) for site in sites] or [1])
    set_threads(cfg.threads)
    serve(Worker(cfg, load_cloud(cfg.checkpoint)))
    return 0


def _text(entry_id: bytes | str) -> str:
    """A stream entry id as text."""
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def registered_sites(redis_url: str) -> list[str]:
    """The sites in the registry (`--sites '*'`) for `--check`; none when Redis cannot be read
    within the check's timeout."""
    try:
        client = redis_client(redis_url, timeout_s=CHECK_TIMEOUT_S)
        return sorted(x.decode() for x in client.smembers(names.sites_key()))
    except (ConnectError, redis.RedisError) as err:
        log.error("check cloud: the site registry could not be read: %s", err)
        return []


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `cloud` to the `ada-ddnn` parser."""
    add_command(subparsers, "cloud", CloudConfig, main, help="cloud worker: answer escalated frames in batches",
                description=__doc__, check="exit 0 if a cloud worker of the site (of every site served) is alive, else 1")
