import shutil
import socket

import paho.mqtt.client as mqtt
import pytest
import redis

from pipeline.errors import ServiceError
from pipeline.transport import embedded
from pipeline.transport.embedded import embedded_services
from pipeline.transport.mqtt_client import parse_mqtt_url


@pytest.mark.services
def test_embedded_servers_answer_and_stop():
    if not shutil.which("mosquitto") or not embedded._redis_executable():
        pytest.skip("mosquitto or a Redis server is not installed")
    with embedded_services() as (mqtt_url, redis_url):
        r = redis.Redis.from_url(redis_url)
        assert r.ping()
        r.close()
        u = parse_mqtt_url(mqtt_url)
        host, port = u.host, u.port
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        assert client.connect(host, port) == mqtt.MQTT_ERR_SUCCESS
        client.disconnect()
    for p in (port, int(redis_url.rsplit(":", 1)[1].split("/")[0])):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p), timeout=0.5).close()


def test_given_urls_start_nothing(monkeypatch):
    monkeypatch.setattr(embedded, "start_mqtt", lambda: pytest.fail("must not start a broker"))
    monkeypatch.setattr(embedded, "start_redis", lambda: pytest.fail("must not start redis"))
    with embedded_services("mqtt://example:1883", "redis://example:6379/0") as urls:
        assert urls == ("mqtt://example:1883", "redis://example:6379/0")


def test_no_broker_to_embed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    with pytest.raises(ServiceError, match="install Mosquitto"):
        embedded.start_mqtt()
    monkeypatch.setattr(embedded, "_redis_executable", lambda: None)
    with pytest.raises(ServiceError, match="redis-server"):
        embedded.start_redis()
