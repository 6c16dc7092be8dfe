"""Taking over the MQTT sessions of aggregators that died.

An aggregator with a stable `--service-id` keeps a persistent MQTT session, so that what the
cameras send while it restarts waits for it in the broker. If it dies and does not come back,
its session outlives it by `--session-expiry-s` (300 s by default), and all the while the broker
goes on handing that session its share of the shared subscriptions: half of a two-aggregator
site's observations would wait in a dead session, and those still there at the expiry would be
dropped with nobody to name them.

So each aggregator registers its persistent session in the site's hash
`ada:{site}:edge_sessions` (service id -> session expiry), and every aggregator alive looks
there every REAP_INTERVAL_S for sessions whose owner's heartbeat has expired and stayed so for
a grace period (two heartbeat periods and a second: an owner that only missed beats while Redis
was away writes them again in that time). One of them (a lock per session) connects under the dead one's client ids, resuming its sessions: it
unsubscribes them at once, so that the broker hands the site's traffic to the live aggregators
only, and takes the messages already queued into its own inbox, where they are stored like any
other and acknowledged on the connection they came on. Once nothing has come for QUIET_S and
all that came is acknowledged, it ends the sessions (session expiry 0 at DISCONNECT) and
removes the entry. An owner that comes back meanwhile (its heartbeat again, or the broker
handing its session back to it) ends the take-over: what the reaper had not acknowledged, the
broker delivers to the owner again, and the frame store drops what was stored twice.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.errors import ConnectError
from pipeline.transport.mqtt_client import MqttClient
from pipeline.transport.redis_client import alive
from pipeline.wire import names

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 2.0  # how often an aggregator looks for sessions of dead aggregators
QUIET_S = 0.5  # a session taken over is drained once nothing came on it for this long, all of it acknowledged
LOCK_MS = 60_000  # one aggregator takes over a given session at a time; the lock outlives a reaper that died
CONNECT_S = 3.0  # connecting under the dead aggregator's client id: give up (and try later) after this


class Reaped(NamedTuple):
    """What the inbox holds as a message's connection when it came on a session taken over: the
    client to acknowledge it on, and that client's connection generation."""

    client: MqttClient
    generation: int


def client_ids(site: str, service_id: str) -> tuple[str, str]:
    """The MQTT client ids an aggregator of `site` connects under: observations, and feature
    answers. Role and site are in them: an edge of another site, or a cloud worker, given the
    same --service-id on the same broker never resumes (or ends) this one's session."""
    base = f"edge-{names.check_site(site)}-{service_id}"
    return base, f"{base}-answers"


def register(r: redis.Redis, site: str, service_id: str, expiry_s: int) -> None:
    """Note an aggregator's persistent session, so that another can take it over if it dies."""
    r.hset(names.edge_sessions_key(site), service_id, expiry_s)


def unregister(r: redis.Redis, site: str, service_id: str) -> None:
    r.hdel(names.edge_sessions_key(site), service_id)


class SessionReaper:
    """One aggregator's side of the take-over (module docstring). `tick` is called from the
    aggregator's loop (a Redis round trip every REAP_INTERVAL_S, nothing in between);
    `acknowledged` by the aggregator for each reaped message it acknowledged."""

    def __init__(self, r: redis.Redis, mqtt_url: str, site: str, service_id: str, share_group: str,
                 put: Callable[[mqtt.MQTTMessage, Reaped], None], receive_maximum: int, heartbeat_s: float) -> None:
        self.redis, self.url, self.site, self.sid = r, mqtt_url, site, service_id
        self.filters = [names.shared_obs_filter(site, share_group), names.shared_shed_filter(site, share_group),
                        names.shared_features_filter(site, share_group)]
        self.put, self.receive_maximum = put, receive_maximum
        self.taken = 0  # sessions of dead aggregators taken over and ended
        self.messages = 0  # messages those sessions held, taken into this aggregator's inbox
        self._next = time.monotonic() + REAP_INTERVAL_S
        self._owner: str | None = None  # the dead aggregator whose sessions are being drained
        self._clients: list[MqttClient] = []
        self._received = self._acked = 0
        self._last = 0.0  # monotonic time of the last message on a session taken over
        self.grace_s = 2 * heartbeat_s + 1.0  # a registered owner without a heartbeat this long is dead
        self._dead_since: dict[str, float] = {}  # owner -> monotonic time it was first seen without a heartbeat

    def _message(self, client: MqttClient, msg: mqtt.MQTTMessage) -> None:  # paho's network thread
        self._received += 1
        self._last = time.monotonic()
        self.put(msg, Reaped(client, client.generation))

    def acknowledged(self) -> None:
        self._acked += 1

    def tick(self) -> None:
        """Look for a dead aggregator's session to take over, or go on with the one being drained."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + (QUIET_S if self._owner else REAP_INTERVAL_S)
        if self._owner is not None:
            self._drain()
            return
        keys = self.redis.hkeys(names.edge_sessions_key(self.site))
        registered = {k.decode(errors="replace") if isinstance(k, bytes) else k for k in keys}
        registered = {k for k in registered if names.SERVICE_RE.match(k)}  # what an aggregator can have written
        silent = {o for o in registered - {self.sid} if not alive(self.redis, self.site, "edge", o)}  # EXISTS each
        self._dead_since = {o: self._dead_since.get(o, now) for o in silent}
        for owner in sorted(o for o, since in self._dead_since.items() if now - since >= self.grace_s):
            if self.redis.set(names.edge_reap_lock_key(self.site, owner), self.sid, nx=True, px=LOCK_MS):
                self._take(owner)
                return

    def _take(self, owner: str) -> None:
        expiry = self.redis.hget(names.edge_sessions_key(self.site), owner)
        try:
            expiry_s = max(1, int(expiry or 1))
        except ValueError:  # no aggregator wrote that: the session is taken over and ends a second after
            log.warning("edge %s: site %r: %s's session expiry in %s is %r, no number; taking it over for 1 s",
                        self.sid, self.site, owner, names.edge_sessions_key(self.site), expiry[:40])
            expiry_s = 1
        log.warning("edge %s: site %r: aggregator %s is dead (no heartbeat) and left a persistent MQTT session; "
                    "taking it over, so that the broker hands its share to the live aggregators and what it queued "
                    "is stored here", self.sid, self.site, owner)
        self._owner, self._received, self._acked, self._last = owner, 0, 0, time.monotonic()
        try:
            for cid in client_ids(self.site, owner):
                holder: list[MqttClient] = []
                client = MqttClient(self.url, cid, on_message=lambda m, h=holder: self._message(h[0], m),
                                    manual_ack=True, receive_maximum=self.receive_maximum, session_expiry_s=expiry_s,
                                    reconnect=False)
                holder.append(client)
                self._clients.append(client.connect(CONNECT_S))
                client.client.unsubscribe(self.filters)  # no more of the site's traffic for the dead session
        except ConnectError as err:
            log.warning("edge %s: site %r: could not take over %s's session (%s); trying again later", self.sid,
                        self.site, owner, err)
            self._abandon()

    def _drain(self) -> None:
        owner = self._owner
        assert owner is not None
        if alive(self.redis, self.site, "edge", owner) or not all(c.connected.is_set() for c in self._clients):
            log.warning("edge %s: site %r: aggregator %s is back; leaving its session to it (%d of its messages "
                        "stored here meanwhile)", self.sid, self.site, owner, self._acked)
            self.messages += self._acked
            self._abandon()
            return
        if time.monotonic() - self._last < QUIET_S or self._acked < self._received:
            return
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # the broker forgets the session now
        for client in self._clients:
            client.close(properties=props)
        self._clients = []
        unregister(self.redis, self.site, owner)
        self.redis.delete(names.edge_reap_lock_key(self.site, owner))
        self.taken += 1
        self.messages += self._received
        log.warning("edge %s: site %r: took over and ended the session of dead aggregator %s: %d messages it held "
                    "were stored here", self.sid, self.site, owner, self._received)
        self._owner = None
        self._next = time.monotonic() + REAP_INTERVAL_S

    def _abandon(self) -> None:
        """Stop draining, leaving the session as it is (its owner is back, or the broker is away)."""
        for client in self._clients:
            client.close(timeout_s=0.0)
        self._clients = []
        if self._owner is not None:
            try:
                self.redis.delete(names.edge_reap_lock_key(self.site, self._owner))
            except redis.RedisError:
                pass  # the lock expires by itself
        self._owner = None
        self._next = time.monotonic() + REAP_INTERVAL_S

    def close(self) -> None:
        """The aggregator stops: a session half drained stays with the broker for another to take."""
        if self._owner is not None:
            log.info("edge %s: site %r: stopping while taking over %s's session; another aggregator will", self.sid,
                     self.site, self._owner)
            self._abandon()
