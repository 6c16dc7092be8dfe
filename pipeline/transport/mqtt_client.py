"""MQTT clients of every role: paho MQTT v5, connected with capped exponential backoff."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from pipeline.errors import ConnectError, ServiceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0  # give up on a broker after this long (retrying with capped backoff meanwhile)
BACKOFF_MIN_S = 0.1  # first retry delay
BACKOFF_MAX_S = 5.0  # cap of the exponential backoff between retries
MQTT_KEEPALIVE_S = 30


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """`mqtt://host[:port]` (or `tcp://`, or a bare `host:port`) -> (host, port); port defaults to 1883."""
    if "://" not in url:
        url = "mqtt://" + url
    u = urlparse(url)
    if u.scheme not in ("mqtt", "tcp"):
        raise ServiceError(f"MQTT URL {url!r}: scheme must be mqtt:// or tcp://")
    if not u.hostname:
        raise ServiceError(f"MQTT URL {url!r}: no host")
    try:
        port = u.port or 1883
    except ValueError as err:
        raise ServiceError(f"MQTT URL {url!r}: bad port") from err
    return u.hostname, port


def mqtt_client(url: str, client_id: str, on_connect: Callable[[mqtt.Client], None] | None = None,
                on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
                will: tuple[str, bytes] | None = None) -> mqtt.Client:
    """A connected MQTT v5 client with its network thread running.

    `on_connect(client)` runs on every (re)connect: subscribe there so subscriptions survive
    reconnects. `on_message(msg)` runs in the network thread: keep it tiny. `will` is a retained
    QoS 1 last will (topic, payload). Reconnects use paho's capped backoff."""
    host, port = parse_mqtt_url(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.reconnect_delay_set(min_delay=1, max_delay=int(BACKOFF_MAX_S))
    client.max_queued_messages_set(0)  # paho queues publishes while reconnecting, unbounded
    connected = threading.Event()

    def _on_connect(c, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho callback
        if reason_code.is_failure:
            log.warning("MQTT %s at %s refused the connection: %s", client_id, url, reason_code)
            return
        try:
            if on_connect is not None:
                on_connect(c)
        except Exception:  # noqa: BLE001 - a callback error must be logged, never swallowed silently
            log.exception("MQTT %s: on_connect failed", client_id)
        connected.set()

    def _on_disconnect(c, userdata, flags, reason_code, properties):  # noqa: ANN001
        if reason_code != 0:
            log.warning("MQTT %s lost the connection to %s (%s); paho reconnects with backoff", client_id, url, reason_code)

    def _on_message(c, userdata, msg):  # noqa: ANN001
        try:
            on_message(msg)  # type: ignore[misc]
        except Exception:  # noqa: BLE001
            log.exception("MQTT %s: on_message failed for topic %s", client_id, msg.topic)

    client.on_connect = _on_connect
    client.on_disconnect = _on_disconnect
    if on_message is not None:
        client.on_message = _on_message
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    delay, deadline = BACKOFF_MIN_S, time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            client.connect(host, port, keepalive=MQTT_KEEPALIVE_S, clean_start=True)
            break
        except OSError as err:
            if time.monotonic() + delay > deadline:
                raise ConnectError(f"MQTT broker {url} unreachable for {CONNECT_TIMEOUT_S:.0f}s: {err}") from err
            log.warning("MQTT broker %s unreachable (%s); retrying in %.1fs", url, err, delay)
            time.sleep(delay)  # backoff between connection attempts
            delay = min(BACKOFF_MAX_S, delay * 2)
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S):
        client.loop_stop()
        raise ConnectError(f"MQTT broker {url} accepted TCP but no MQTT session for {client_id}")
    return client


def close_mqtt(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
