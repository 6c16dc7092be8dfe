"""MQTT clients of every role: paho MQTT v5 that survives a broker restart.

    mqtt://host[:port]                      plain (port 1883)
    mqtts://user:password@host[:port]?ca=/etc/ada/ca.pem&cert=...&key=...   TLS (port 8883)

`MqttClient` connects with capped exponential backoff and then reconnects forever (paho's
loop), resubscribing in `on_connect`. A publish never raises because the broker is away: paho
keeps QoS 1 messages until they are acknowledged, also across a reconnect, and the client
tracks each one by its PUBACK (`unconfirmed`, `wait_confirmed`), so a caller never blocks on
one acknowledgement at a time. With `manual_ack` a received QoS 1 message is acknowledged only
when the caller says so (`ack`), after it has stored it: a crash before that leaves the message
with the broker. `receive_maximum` caps the unacknowledged messages the broker sends us (MQTT v5
flow control), so the network thread never waits on a full queue. With `session_expiry_s` > 0
the session (subscriptions and queued QoS 1 messages) survives a disconnect of that long.

A PUBACK only says the broker has the message in memory: a broker SIGKILLed before it delivered
or saved it (Mosquitto saves every `autosave_interval`) loses it. With `resend_s` > 0 the client
keeps what it published (QoS 1, not retained) for that long, and after a reconnect publishes
again those the broker had acknowledged in the last `resend_s` before the connection was lost
(paho itself resends the unacknowledged ones). Receivers must drop duplicates (the edge does:
a frame's observation is stored once, and one for a decided frame is counted late). Cameras use
it, so that a broker crash loses no observation the broker had not yet saved. A broker that
restarted without the receivers' sessions drops whatever comes before they subscribe again, the
resend included: with `resend_after` > 0 the resend waits for `release_resend()` (the caller's
sign that a receiver is back; at most `resend_after` seconds) and then also covers what was
published since the reconnect.

A refused login or a TLS mismatch fails the first connect at once with a clear error: those
never heal by retrying.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.errors import ConnectError, ServiceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # give up on a broker after this long at start-up (retrying with capped backoff meanwhile)
BACKOFF_MIN_S = 0.1  # first retry delay
BACKOFF_MAX_S = 5.0  # cap of the exponential backoff between retries
MQTT_KEEPALIVE_S = 15  # a dead connection is noticed within 1.5x this
MAX_QUEUED = 100_000  # QoS 1 publishes kept while the broker is away; beyond, publish refuses (counted)
PRUNE_EVERY = 1000  # publishes between two prunings of the acknowledged ones (amortized: O(1) a publish)
MAX_RESEND = 100_000  # publishes kept for a resend after a reconnect, at most (the oldest go first)
MAX_INFLIGHT = 1000  # QoS 1 publishes sent and not yet acknowledged (paho's default of 20 caps a camera at ~20 per round trip)
FATAL_CONNACK = ("Bad user name or password", "Not authorized", "Banned", "Client identifier not valid",
                 "Bad authentication method")


@dataclass(frozen=True)
class MqttUrl:
    """What an MQTT URL says: where, who, and how to check TLS."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None  # CA bundle for the broker's certificate (default: the system's)
    cert: str | None = None  # client certificate (mutual TLS)
    key: str | None = None  # its private key

    def safe(self) -> str:
        """The URL without the password, for logs."""
        who = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{who}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """`mqtt://[user:pass@]host[:port]` (or `tcp://`, or a bare `host:port`), `mqtts://...?ca=&cert=&key=`."""
    if not url.strip():
        raise ServiceError("MQTT URL '': empty (mqtt://host:port)")
    if "://" not in url:
        url = "mqtt://" + url
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ServiceError(f"MQTT URL {_hide(url)!r}: scheme must be mqtt://, tcp:// or mqtts://")
    if not u.hostname:
        raise ServiceError(f"MQTT URL {_hide(url)!r}: no host")
    if u.path not in ("", "/") or u.params or u.fragment:
        raise ServiceError(f"MQTT URL {_hide(url)!r}: an MQTT broker is host and port only, without a path")
    tls = u.scheme in ("mqtts", "ssl")
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError as err:
        raise ServiceError(f"MQTT URL {_hide(url)!r}: bad port") from err
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = set(query) - {"ca", "cert", "key"}
    if unknown:
        raise ServiceError(f"MQTT URL {_hide(url)!r}: unknown options {sorted(unknown)} (ca, cert, key)")
    if query and not tls:
        raise ServiceError(f"MQTT URL {_hide(url)!r}: ca/cert/key need mqtts://")
    return MqttUrl(u.hostname, port, tls, unquote(u.username) if u.username else None,
                   unquote(u.password) if u.password else None, query.get("ca"), query.get("cert"), query.get("key"))


def _hide(url: str) -> str:
    u = urlparse(url)
    return url.replace(f":{u.password}@", ":***@") if u.password else url


def _no_delay(client: mqtt.Client, userdata, sock) -> None:  # noqa: ANN001
    """TCP_NODELAY on every connection: a small message (a summary, a feature request or answer,
    an acknowledgement) is sent at once instead of waiting for the ACK of the previous segment
    (Nagle's algorithm, which with delayed ACKs costs tens of ms a message)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as err:  # not a TCP socket (a test double, a proxy): keep Nagle
        log.debug("MQTT: TCP_NODELAY not set (%s)", err)


class MqttClient:
    """One role's MQTT v5 connection (see the module docstring)."""

    def __init__(self, url: str, client_id: str, *, on_connect: Callable[[mqtt.Client], None] | None = None,
                 on_message: Callable[[mqtt.MQTTMessage], None] | None = None, will: tuple[str, bytes] | None = None,
                 manual_ack: bool = False, receive_maximum: int | None = None, session_expiry_s: int = 0,
                 resend_s: float = 0.0, reconnect: bool = True, resend_after: float = 0.0) -> None:
        self.url, self.client_id = parse_mqtt_url(url), client_id
        self._on_connect, self._on_message = on_connect, on_message
        self.session_expiry_s, self.receive_maximum = session_expiry_s, receive_maximum
        self.connected = threading.Event()
        self.generation = 0  # connections so far; a message's mid means something only in its own
        self.reconnects = 0  # connections after the first
        self.refused = 0  # publishes refused because MAX_QUEUED were waiting
        self.denied = 0  # publishes the broker acknowledged with a failure (not authorized by its ACL, ...)
        self._refusal: str | None = None
        self._pending: list[mqtt.MQTTMessageInfo] = []  # QoS 1 publishes not yet known to be acknowledged
        self._prune_at = PRUNE_EVERY
        self._lock = threading.Lock()
        self._ever_connected = False
        self.resend_s = resend_s
        self.resent = 0  # acknowledged publishes sent again after reconnects (`resend_s`)
        # (monotonic time, topic, payload, qos, info) of the publishes kept for a resend, oldest first
        self._sent: collections.deque[tuple[float, str, bytes, int, mqtt.MQTTMessageInfo]] = collections.deque()
        self._lost_at: float | None = None  # monotonic time the connection was lost (None: connected)
        self.resend_after = resend_after
        self._resend_since: float | None = None  # a resend held for `release_resend`: from this monotonic time on
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                        reconnect_on_failure=reconnect)  # False: a lost connection stays lost
        c.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_MAX_S))
        c.max_queued_messages_set(MAX_QUEUED)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.manual_ack_set(manual_ack)
        if self.url.username:
            c.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            try:
                c.tls_set(ca_certs=self.url.ca, certfile=self.url.cert, keyfile=self.url.key,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as err:
                files = ", ".join(f"{k}={v}" for k, v in (("ca", self.url.ca), ("cert", self.url.cert),
                                                           ("key", self.url.key)) if v) or "the system's CA store"
                raise ServiceError(f"MQTT URL {self.url.safe()}: cannot set up TLS from {files}: "
                                   f"{getattr(err, 'strerror', None) or err}") from None
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_publish = self._connected, self._disconnected, self._published
        c.on_socket_open = _no_delay
        if on_message is not None:
            c.on_message = self._message
        self.client = c

    # -- paho callbacks (network thread: keep them short, log every exception) --
    def _connected(self, c: mqtt.Client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            log.error("MQTT %s: %s refused the connection: %s", self.client_id, self.url.safe(), reason_code)
            return
        self.generation += 1
        if self._ever_connected:
            self.reconnects += 1
            log.warning("MQTT %s: reconnected to %s (session %s)", self.client_id, self.url.safe(),
                        "resumed" if flags.session_present else "new")
        self._ever_connected = True
        try:
            if self._on_connect is not None:
                self._on_connect(c)
        except Exception:  # noqa: BLE001 - a callback error must be logged, never swallowed silently
            log.exception("MQTT %s: on_connect failed", self.client_id)
        if self.resend_s > 0 and self._lost_at is not None:
            since = self._lost_at - self.resend_s
            if self.resend_after > 0:
                self._hold(since)
                log.info("MQTT %s: holding the resend until a receiver is back (at most %.0f s): a broker that lost "
                         "the receivers' sessions drops what comes before they subscribe again", self.client_id,
                         self.resend_after)
                timer = threading.Timer(self.resend_after, self.release_resend)
                timer.daemon = True
                timer.start()
            else:
                self._resend(since)
        self._lost_at = None
        self.connected.set()

    def release_resend(self) -> None:
        """A receiver is back (or `resend_after` is over): make the resend held since the last
        reconnect, if any, now (any thread)."""
        with self._lock:
            since, self._resend_since = self._resend_since, None
        if since is not None and self.connected.is_set():
            self._resend(since)
        elif since is not None:  # lost again meanwhile: the next reconnect holds it again
            self._hold(since)

    def _hold(self, since: float) -> None:
        """Hold a resend from `since` on (merged with one held already: the earlier start)."""
        with self._lock:
            self._resend_since = since if self._resend_since is None else min(self._resend_since, since)

    def _resend(self, since: float) -> None:
        """After a reconnect: publish again what the broker acknowledged from `since` on (the last
        `resend_s` before the connection was lost, and with `resend_after` what came after the
        reconnect; the broker may have died with them unsaved, or dropped them for want of a
        subscriber). The unacknowledged ones stay kept as they are: paho resends those itself."""
        with self._lock:
            kept = [e for e in self._sent if e[0] >= since]
            self._sent.clear()
            self._sent.extend(e for e in kept if not e[4]._published)
        acked = [(topic, payload, qos) for _, topic, payload, qos, info in kept if info._published]
        n = sum(self.publish(*e) for e in acked)  # kept again from now: the broker has them only from now
        self.resent += n
        if n:
            log.warning("MQTT %s: published again %d messages the broker acknowledged in the last %.1f s before the "
                        "connection was lost (it may have lost them; receivers drop duplicates)", self.client_id, n,
                        self.resend_s)
        if n < len(acked):
            log.error("MQTT %s: %d publishes wait already; %d acknowledged messages are not sent again",
                      self.client_id, MAX_QUEUED, len(acked) - n)

    def _disconnected(self, c: mqtt.Client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self.connected.clear()
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        if not self._ever_connected and self._refusal is None:
            self._refusal = f"closed before answering ({reason_code})"
        if reason_code != 0:
            log.warning("MQTT %s lost %s (%s); reconnecting with backoff, %d publishes waiting", self.client_id,
                        self.url.safe(), reason_code, self.unconfirmed)

    def _published(self, c: mqtt.Client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        """A PUBACK: a failing reason (the ACL said no) means the message went nowhere."""
        if reason_code.is_failure:
            self.denied += 1
            if self.denied in (1, 10, 100) or self.denied % 1000 == 0:
                log.error("MQTT %s: %s refused a publish (%s); %d refused so far: check the broker's ACL for this "
                          "user", self.client_id, self.url.safe(), reason_code, self.denied)

    def _message(self, c: mqtt.Client, userdata, msg: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        try:
            self._on_message(msg)  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            log.exception("MQTT %s: on_message failed for topic %s", self.client_id, msg.topic)

    # -- life cycle --
    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> "MqttClient":
        """Connect (retrying an unreachable broker with capped backoff for `timeout_s`) and start
        the network thread; ConnectError at once when the broker refuses the login or TLS fails."""
        props = Properties(PacketTypes.CONNECT)
        if self.session_expiry_s:
            props.SessionExpiryInterval = self.session_expiry_s
        if self.receive_maximum:
            props.ReceiveMaximum = self.receive_maximum
        delay, deadline = BACKOFF_MIN_S, time.monotonic() + timeout_s
        where = self.url.safe()
        while True:
            try:
                self.client.connect(self.url.host, self.url.port, keepalive=MQTT_KEEPALIVE_S,
                                    clean_start=not self.session_expiry_s, properties=props)
                break
            except ssl.SSLError as err:
                raise ConnectError(f"MQTT broker {where}: TLS failed ({err}); is it a TLS port, and is the CA right?") from err
            except OSError as err:
                if self.url.tls and not isinstance(err, (ConnectionRefusedError, socket.gaierror, TimeoutError)):
                    raise ConnectError(f"MQTT broker {where}: the TLS handshake failed ({err}); is it a TLS "
                                       "port?") from err
                if time.monotonic() + delay > deadline:
                    raise ConnectError(f"MQTT broker {where} unreachable for {timeout_s:.0f}s: {err}") from err
                log.warning("MQTT broker %s unreachable (%s); retrying in %.1fs", where, err, delay)
                time.sleep(delay)  # backoff between connection attempts
                delay = min(BACKOFF_MAX_S, delay * 2)
        self.client.loop_start()
        end = time.monotonic() + timeout_s
        while not self.connected.wait(0.05):
            if self._refusal is not None and any(text in self._refusal for text in (*FATAL_CONNACK, "closed before")):
                self.close()
                hint = "" if self.url.tls else " (a TLS port needs mqtts://)" if "closed" in self._refusal else ""
                if "Not authorized" in self._refusal or "user name or password" in self._refusal:
                    user = self.url.username
                    hint = (f" (the login {user!r}: a wrong password, or a user the broker does not know)" if user
                            else " (no login in the URL: mqtt://USER:PASSWORD@host:port)")
                raise ConnectError(f"MQTT broker {where} refused {self.client_id}: {self._refusal}{hint}")
            if time.monotonic() > end:
                self.close()
                reason = f": {self._refusal}" if self._refusal else " (TLS on a plain port, or a plain URL on a TLS port?)"
                raise ConnectError(f"MQTT broker {where} accepted TCP but no MQTT session for {self.client_id}{reason}")
        return self

    def close(self, timeout_s: float = 5.0, properties: Properties | None = None) -> None:
        """Wait up to `timeout_s` for unacknowledged publishes, then disconnect (with the DISCONNECT
        `properties`, e.g. a session expiry of 0 that ends a persistent session)."""
        if self.connected.is_set():
            self.wait_confirmed(timeout_s)
        self.client.disconnect(properties=properties)
        self.client.loop_stop()

    # -- traffic --
    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos=qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue a publish; False only when MAX_QUEUED publishes are already waiting (counted)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.refused += 1
            return False
        if qos > 0:
            with self._lock:
                self._pending.append(info)
                if len(self._pending) >= self._prune_at:  # a role that never asks must not keep them all
                    self._prune()
                if self.resend_s > 0 and not retain:
                    self._keep(topic, payload, qos, info)
        return True

    def _keep(self, topic: str, payload: bytes, qos: int, info: mqtt.MQTTMessageInfo) -> None:
        """Keep a publish for `_resend` (caller holds the lock); forget those older than `resend_s`
        before now, or before the loss of the connection while it is lost."""
        now = time.monotonic()
        self._sent.append((now, topic, payload, qos, info))
        lost = self._lost_at
        horizon = (now if lost is None else lost) - self.resend_s
        if self._resend_since is not None:  # a resend is held: keep all it covers
            horizon = min(horizon, self._resend_since)
        while self._sent and (self._sent[0][0] < horizon or len(self._sent) > MAX_RESEND):
            self._sent.popleft()

    def ack(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        """Acknowledge a QoS 1 message received on connection `generation` (with manual_ack): the
        broker forgets it. One from an earlier connection is not acknowledged: its mid may now
        name another message, and a resumed session sends it again (dropped then as a duplicate)."""
        if msg.qos > 0 and generation == self.generation:
            self.client.ack(msg.mid, msg.qos)

    @property
    def unconfirmed(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet (queued while away included)."""
        with self._lock:
            self._prune()
            return len(self._pending)

    def _prune(self) -> None:
        """Forget acknowledged publishes (caller holds the lock). `_published` is set on the PUBACK,
        also for a message resent after a reconnect, where the public `is_published()` raises
        because the first attempt found no connection."""
        self._pending = [info for info in self._pending if not info._published]
        self._prune_at = 2 * len(self._pending) + PRUNE_EVERY

    def wait_confirmed(self, timeout_s: float) -> bool:
        """Block until every QoS 1 publish so far is acknowledged by the broker, or `timeout_s`."""
        end = time.monotonic() + timeout_s
        while self.unconfirmed:
            if time.monotonic() > end:
                return False
            time.sleep(0.005)  # PUBACKs arrive on paho's thread; polling keeps its callbacks lock-free
        return True


QOS0_BACKLOG = 10_000  # an Inbox takes no QoS 0 message while this many wait (the broker's flow control skips them)
QOS0_LOG_S = 10.0  # a line about QoS 0 messages dropped at most this often


class Inbox:
    """Received messages handed from paho's network thread to a role's loop. `put` never blocks
    (the network thread must never wait on the loop: that deadlocked the edge once); with
    manual acknowledgement the broker sends at most `receive_maximum` unacknowledged messages,
    which bounds it. That flow control covers QoS 1 and 2 only: a QoS 0 message (at most once, by
    its sender's choice; our cameras send QoS 1) is dropped while `qos0_backlog` messages wait,
    counted in `dropped_qos0`, so a flood of them cannot fill the memory while the loop is held
    up. Messages `urgent` says yes to are taken before the others (the edge's feature answers,
    which frames already claimed wait for)."""

    def __init__(self, client_generation: Callable[[], int],
                 urgent: Callable[[mqtt.MQTTMessage], bool] | None = None, qos0_backlog: int = QOS0_BACKLOG) -> None:
        self._items: collections.deque[tuple[int, mqtt.MQTTMessage]] = collections.deque()
        self._urgent: collections.deque[tuple[int, mqtt.MQTTMessage]] = collections.deque()
        self._ready = threading.Event()
        self._generation = client_generation
        self._is_urgent = urgent
        self.qos0_backlog = qos0_backlog
        self.dropped_qos0 = 0
        self._dropped_log = 0.0

    def put(self, msg: mqtt.MQTTMessage, generation: int | None = None) -> None:
        """Queue a message; `generation`: the connection it came on, when not the default client's."""
        if getattr(msg, "qos", 1) == 0 and len(self) >= self.qos0_backlog:
            self.dropped_qos0 += 1
            if time.monotonic() >= self._dropped_log:
                self._dropped_log = time.monotonic() + QOS0_LOG_S
                log.warning("inbox: %d messages wait; dropping QoS 0 ones (at most once, by their sender's choice) "
                            "until fewer do: %d so far, the last on %s", len(self), self.dropped_qos0, msg.topic)
            return
        queue = self._urgent if self._is_urgent is not None and self._is_urgent(msg) else self._items
        queue.append((self._generation() if generation is None else generation, msg))
        self._ready.set()

    def take(self, n: int, timeout_s: float) -> list[tuple[int, mqtt.MQTTMessage]]:
        """(connection generation, message) pairs: the urgent ones first (up to `n` of them), then up
        to `n` others, so urgent messages never take the place of the others in a batch; waits at
        most `timeout_s` for the first."""
        if not self._items and not self._urgent:
            self._ready.wait(timeout_s)
        self._ready.clear()
        out = []
        for queue in (self._urgent, self._items):
            for _ in range(min(n, len(queue))):
                out.append(queue.popleft())
        if self._items or self._urgent:
            self._ready.set()
        return out

    def __len__(self) -> int:
        return len(self._items) + len(self._urgent)


def mqtt_client(url: str, client_id: str, on_connect: Callable[[mqtt.Client], None] | None = None,
                on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
                will: tuple[str, bytes] | None = None, timeout_s: float = CONNECT_TIMEOUT_S, **options) -> MqttClient:
    """A connected `MqttClient` with its network thread running (see the module docstring); an
    unreachable broker is retried for `timeout_s`."""
    return MqttClient(url, client_id, on_connect=on_connect, on_message=on_message, will=will,
                      **options).connect(timeout_s)


def close_mqtt(client: MqttClient) -> None:
    client.close()
