"""`ada-ddnn status`: one table of a live site, read from its brokers.

    ada-ddnn status --site site0                      # the table
    ada-ddnn status --site site0 --json               # the same as JSON
    ada-ddnn status --site site0 --watch 5            # again every 5 s until Ctrl-C

What it reads (nothing is written; the `SITE-monitor` user of docker/make-passwords.sh is enough):
- cameras: the retained status of each camera (`ada/{site}/cam/+/status`: online, done or
  offline, the last will) and the aggregators' retained flow status (how late observations reach
  them);
- services: the heartbeat keys of the edge aggregators and cloud workers (alive = not expired);
- backlog: open frames (`ada:{site}:pending`), claimed frames, escalations waiting in the stream
  and entries the cloud has read but not acknowledged, dead letters and named losses in all;
- decisions over the last `--window-s` seconds (results stream entry ids are their times): the
  rate and the mix of exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import msgpack
import paho.mqtt.client as mqtt
import redis

from pipeline.errors import ConnectError, MessageError
from pipeline.settings import DEFAULT_MQTT_URL, DEFAULT_REDIS_URL, add_command, check_fields, config_from_args, printed
from pipeline.transport.mqtt_client import close_mqtt, mqtt_client
from pipeline.transport.redis_client import alive, group_gone, redis_client
from pipeline.wire import names
from pipeline.wire.control import FlowStatus
from pipeline.wire.messages import EXIT_NAMES, CameraStatus, Decision

log = logging.getLogger(__name__)

RETAINED_WAIT_S = 1.0  # retained messages arrive right after subscribing; wait this long for the last
RETAINED_QUIET_S = 0.3  # ... or until none came for this long, once a camera's status is in
CONNECT_TIMEOUT_S = 3.0  # an interactive look: a broker that does not answer by then is reported, not awaited
FLOW_STALE_S = 10.0  # a flow status older than this is shown as stale (an aggregator killed leaves its last one retained)


@dataclass(frozen=True)
class StatusConfig:
    site: str = "site0"  # site id: prefix of every topic and key
    mqtt_url: str = DEFAULT_MQTT_URL  # Mosquitto, mqtt://host:port
    redis_url: str = DEFAULT_REDIS_URL  # Redis, redis://host:port/db or redis+cluster://host:port,...
    window_s: float = field(default=60.0, metadata={"above": 0, "max": 31536000})  # decisions over this many seconds back give the rate and the exit mix
    cloud_group: str = names.CLOUD_GROUP  # the cloud workers' consumer group

    def __post_init__(self) -> None:
        check_fields(self)  # ranges, as declared on the fields
        names.check_site(self.site)


@dataclass
class SiteStatus:
    site: str
    at: float
    cameras: dict[int, str] = field(default_factory=dict)  # camera -> online | done | offline
    flow: dict[str, float] = field(default_factory=dict)  # aggregator (service id) -> lag of observations (ms)
    flow_age_s: dict[str, float] = field(default_factory=dict)  # aggregator -> age of its flow status (s)
    aggregators: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    backlog: dict[str, int] = field(default_factory=dict)
    window_s: float = 60.0
    decided: int = 0  # decisions in the window
    exits: dict[str, int] = field(default_factory=dict)
    rate_fps: float = 0.0
    errors: list[str] = field(default_factory=list)  # what could not be read (a broker), and why: exit status 1
    warnings: list[str] = field(default_factory=list)  # what was read but is malformed or forged (retained messages, results)


def read_mqtt(cfg: StatusConfig, st: SiteStatus, wait_s: float = RETAINED_WAIT_S) -> None:
    """The retained camera statuses and flow statuses of the site."""
    arrived = threading.Event()  # set by every message; the burst of retained ones is over when it stays clear

    def on_message(msg: mqtt.MQTTMessage) -> None:
        arrived.set()
        try:
            if msg.topic.endswith("/status"):
                s = CameraStatus.decode(msg.payload)
                if s.site != cfg.site or msg.topic != names.status_topic(cfg.site, s.camera):  # its own topic only
                    raise MessageError(f"a status of site {s.site!r} camera {s.camera} on {msg.topic}: a camera "
                                       "speaks on its own topic only")
                st.cameras[s.camera] = s.state
            else:
                f = FlowStatus.decode(msg.payload)
                if f.site != cfg.site or f.by != msg.topic.rsplit("/", 1)[-1]:
                    raise MessageError(f"a flow status of site {f.site!r} by {f.by!r} on {msg.topic}: an aggregator "
                                       "reports for its own site on its own topic only")
                who = f.by
                st.flow[who] = round(float(f.lag_ms), 1)
                st.flow_age_s[who] = round(st.at - float(f.at), 1)
        except (MessageError, AttributeError, ValueError) as err:
            st.warnings.append(f"bad retained message on {msg.topic}: {err}")

    def on_connect(c: mqtt.Client) -> None:
        c.subscribe([(names.status_filter(cfg.site), 1), (names.flow_filter(cfg.site), 1)])

    try:
        client = mqtt_client(cfg.mqtt_url, f"{cfg.site}-status-{time.monotonic_ns():x}", on_connect=on_connect,
                             on_message=on_message, timeout_s=CONNECT_TIMEOUT_S)
    except ConnectError as err:
        st.errors.append(f"MQTT: {err}")
        return
    end = time.monotonic() + wait_s
    while (left := end - time.monotonic()) > 0:
        if not arrived.wait(min(RETAINED_QUIET_S, left)) and st.cameras:
            break  # the retained burst is over
        arrived.clear()
    close_mqtt(client)
    # Flow statuses go by a digest of their aggregator's service id: shown by the service id where a
    # heartbeat names it (read_redis runs first), else by the digest (an aggregator not alive).
    by_digest = {names.flow_id(a): a for a in st.aggregators}
    st.flow = {by_digest.get(k, k): v for k, v in st.flow.items()}
    st.flow_age_s = {by_digest.get(k, k): v for k, v in st.flow_age_s.items()}


def read_redis(cfg: StatusConfig, st: SiteStatus) -> None:
    site = cfg.site
    try:
        r = redis_client(cfg.redis_url, timeout_s=CONNECT_TIMEOUT_S)
    except ConnectError as err:
        st.errors.append(f"Redis: {err}")
        return
    try:
        st.aggregators = alive(r, site, "edge")
        st.workers = alive(r, site, "cloud")
        esc = names.escalations_stream(site)
        # Each count on its own: a key Redis refuses (WRONGTYPE: overwritten by hand or by a forger)
        # is a warning naming it, and the rest is still read (errors are for a broker not read at all).
        for name, count, key in (("open_frames", r.zcard, names.pending_key(site)),
                                 ("claimed_frames", r.zcard, names.claimed_key(site)),
                                 ("awaiting_features", r.zcard, names.awaiting_key(site)),
                                 ("escalations", r.xlen, esc),
                                 ("dead_letters", r.xlen, names.deadletter_stream(site)),
                                 ("named_losses", r.xlen, names.losses_stream(site))):
            try:
                st.backlog[name] = int(count(key))
            except redis.ResponseError as err:
                st.warnings.append(f"{key}: {err}")
        try:
            st.backlog["cloud_unacknowledged"] = int(r.xpending(esc, cfg.cloud_group)["pending"])
        except redis.ResponseError as err:
            st.backlog["cloud_unacknowledged"] = 0  # no group yet: no worker has ever read
            if not group_gone(err):
                st.warnings.append(f"{esc}: {err}")
        since_ms = int((st.at - cfg.window_s) * 1000)
        exits: Counter[str] = Counter()
        last_id = f"{since_ms}-0"
        first_ms = None
        try:
            first = r.xrange(names.results_stream(site), min="-", max="+", count=1)  # the site's first result kept
            first_ms = int(first[0][0].split(b"-")[0]) if first else None
            while True:  # the window's results, in pages
                page = r.xrange(names.results_stream(site), min=last_id, max="+", count=1000)
                for entry_id, fields in page:
                    try:
                        if b"msg" not in fields:
                            raise MessageError(f"no 'msg' field (fields: {sorted(fields)[:8]})")
                        exits[Decision.decode(fields[b"msg"]).exit] += 1
                    except (MessageError, msgpack.UnpackException, ValueError) as err:
                        st.warnings.append(f"bad result entry {entry_id!r}: {err}")
                if len(page) < 1000:
                    break
                last_id = "(" + page[-1][0].decode()
        except redis.ResponseError as err:
            st.warnings.append(f"{names.results_stream(site)}: {err}")
        st.exits = {e: exits.get(e, 0) for e in EXIT_NAMES}
        st.decided = sum(exits.values())
        # over the window, or, for a site whose first result came within it, since then (1 s at least)
        span_s = cfg.window_s if first_ms is None else min(cfg.window_s, max(1.0, st.at - first_ms / 1000))
        st.rate_fps = round(st.decided / span_s, 2)
    except redis.RedisError as err:
        st.errors.append(f"Redis: {err}")
    finally:
        r.close()


def site_status(cfg: StatusConfig) -> SiteStatus:
    st = SiteStatus(cfg.site, time.time(), window_s=cfg.window_s)
    read_redis(cfg, st)
    read_mqtt(cfg, st)
    return st


def table(st: SiteStatus) -> str:
    on = sorted(k for k, s in st.cameras.items() if s == "online")
    rows = [("site", st.site),
            ("cameras online", f"{len(on)} of {len(st.cameras)} known " +
             (" ".join(f"{k}:{s}" for k, s in sorted(st.cameras.items())) or "(none announced)")),
            ("edge aggregators alive", f"{len(st.aggregators)} {' '.join(st.aggregators)}".strip()),
            ("cloud workers alive", f"{len(st.workers)} {' '.join(st.workers)}".strip()),
            ("observation lag (ms)", " ".join(_flow(a, lag, st.flow_age_s.get(a)) for a, lag in sorted(st.flow.items()))
             or "-")]
    rows += [(f"backlog: {k.replace('_', ' ')}", str(v)) for k, v in st.backlog.items()]
    mix = " ".join(f"{e} {100 * n / st.decided:.1f}%" for e, n in st.exits.items()) if st.decided else "-"
    rows += [(f"decided, last {st.window_s:g} s", f"{st.decided} ({st.rate_fps:g} frames/s)"), ("exit mix", mix)]
    rows += [("error", e) for e in st.errors[:5]]
    rows += [("warning", w) for w in st.warnings[:5]]
    if len(st.warnings) > 5:
        rows.append(("warning", f"... and {len(st.warnings) - 5} more"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _flow(aggregator: str, lag_ms: float, age_s: float | None) -> str:
    stale = f" (stale: {age_s:.0f} s old; its aggregator stopped without clearing it?)" \
        if age_s is not None and age_s > FLOW_STALE_S else ""
    return f"{aggregator}:{lag_ms:g}{stale}"


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(StatusConfig, args)
    if printed(cfg, args):
        return 0
    if not 0 <= args.watch <= 86_400:
        raise ValueError(f"--watch: seconds between looks, 0 (once) to 86400, got {args.watch}")
    while True:
        st = site_status(cfg)
        print(json.dumps(asdict(st), indent=2) if args.json else table(st), flush=True)
        if not args.watch:
            return 1 if st.errors else 0
        try:
            time.sleep(args.watch)  # the next look at a live site: there is no event to wait on
        except KeyboardInterrupt:
            return 0
        print()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "status", StatusConfig, main, help="one table of a live site: cameras, services, "
                    "backlog, exit mix", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--watch", type=float, default=0.0, metavar="S", help="print again every S seconds (0: once; default 0)")
