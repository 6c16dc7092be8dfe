import threading
import time

import pytest

from pipeline.errors import ServiceError
from pipeline.transport.mqtt_client import Inbox, MqttClient, MqttUrl, parse_mqtt_url


def test_parse_mqtt_url_plain_and_tls():
    assert parse_mqtt_url("mqtt://broker:1884") == MqttUrl("broker", 1884)
    assert parse_mqtt_url("tcp://10.0.0.2") == MqttUrl("10.0.0.2", 1883)
    assert parse_mqtt_url("localhost:1999") == MqttUrl("localhost", 1999)
    u = parse_mqtt_url("mqtts://cam%203:p%40ss@broker?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("broker", 8883, True, "cam 3", "p@ss")
    assert (u.ca, u.cert, u.key) == ("/etc/ca.pem", "/c.pem", "/k.pem")
    assert u.safe() == "mqtts://cam 3@broker:8883" and "p@ss" not in u.safe()
    for bad in ("http://broker:1883", "mqtt://", "mqtt://broker:notaport", "mqtt://broker?ca=/x",
                "mqtts://broker?colour=red"):
        with pytest.raises(ServiceError):
            parse_mqtt_url(bad)


def test_a_bad_url_never_echoes_its_password():
    with pytest.raises(ServiceError) as err:
        parse_mqtt_url("http://user:s3cret@broker")
    assert "s3cret" not in str(err.value)


def test_inbox_put_never_blocks_and_take_keeps_order():
    gen = [1]
    box = Inbox(lambda: gen[0])
    for i in range(5000):  # far beyond any bound a queue.Queue had: put must not block the network thread
        box.put(i)
    gen[0] = 2
    box.put("after reconnect")
    first = box.take(4000, 0)
    assert [m for _, m in first] == list(range(4000)) and {g for g, _ in first} == {1}
    rest = box.take(4000, 0)
    assert rest[-1] == (2, "after reconnect") and len(rest) == 1001
    assert len(box) == 0


def test_inbox_take_wakes_on_put():
    box = Inbox(lambda: 0)
    threading.Timer(0.05, box.put, args=("x",)).start()
    t0 = time.monotonic()
    assert box.take(10, 5.0) == [(0, "x")]
    assert time.monotonic() - t0 < 2.0


@pytest.mark.services
def test_publishes_are_tracked_until_acknowledged(brokers, site):
    c = MqttClient(brokers[0], f"{site}-pub").connect()
    try:
        for i in range(200):
            assert c.publish(f"ada/{site}/test", b"x" * 100)
        assert c.wait_confirmed(10)
        assert c.unconfirmed == 0
    finally:
        c.close()
