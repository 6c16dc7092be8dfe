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


@pytest.mark.services
def test_without_the_binaries_the_servers_run_in_containers(monkeypatch):
    """A machine with Docker and no mosquitto / redis-server on PATH: `replay` still gets its brokers."""
    import os
    import subprocess

    if embedded.container_image("mosquitto") is None or embedded.container_image("redis") is None:
        if os.environ.get("CI"):
            pytest.fail("CI has a Docker engine and the local images (scripts/docker-engine.sh up)")
        pytest.skip("no Docker engine or no Mosquitto / Redis image on this machine")
    real_which = shutil.which
    monkeypatch.setattr(embedded.shutil, "which", lambda name: None if name == "mosquitto" else real_which(name))
    monkeypatch.setattr(embedded, "_redis_executable", lambda: None)
    with embedded_services() as (mqtt_url, redis_url):
        r = redis.Redis.from_url(redis_url)
        assert r.ping()
        r.close()
        u = parse_mqtt_url(mqtt_url)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        assert client.connect(u.host, u.port) == mqtt.MQTT_ERR_SUCCESS
        client.disconnect()
        names = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
        assert f"ada-ddnn-mqtt-{u.port}" in names
    names = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert f"ada-ddnn-mqtt-{u.port}" not in names, "the container outlived its block"
    for p in (u.port, int(redis_url.rsplit(":", 1)[1].split("/")[0])):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
