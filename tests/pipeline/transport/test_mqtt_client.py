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
    assert parse_mqtt_url("mqtt://broker:1884/").port == 1884  # a trailing slash is no path
    for bad in ("http://broker:1883", "mqtt://", "mqtt://broker:notaport", "mqtt://broker?ca=/x",
                "mqtts://broker?colour=red", "mqtt://127.0.0.1:1883/extra/path"):
        with pytest.raises(ServiceError):
            parse_mqtt_url(bad)


def test_tls_files_that_cannot_be_read_are_named(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate")
    for ca, why in ((tmp_path / "none.pem", "No such file"), (tmp_path / "junk.pem", "")):
        with pytest.raises(ServiceError, match=f"cannot set up TLS from ca={ca}: {why}"):
            MqttClient(f"mqtts://user:s3cret@127.0.0.1:8883?ca={ca}", "tls-test")


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


def test_urgent_messages_come_first_and_never_take_the_others_place():
    from types import SimpleNamespace

    inbox = Inbox(lambda: 1, urgent=lambda m: m.topic.endswith("/feat"))
    for i in range(5):
        inbox.put(SimpleNamespace(topic=f"a/{i}/obs"))
    for i in range(3):
        inbox.put(SimpleNamespace(topic=f"a/{i}/feat"), generation=7)  # from another connection
    got = inbox.take(4, 0)
    assert [m.topic for _, m in got] == ["a/0/feat", "a/1/feat", "a/2/feat", "a/0/obs", "a/1/obs", "a/2/obs", "a/3/obs"]
    assert [g for g, _ in got] == [7, 7, 7, 1, 1, 1, 1] and len(inbox) == 1


def test_qos0_messages_are_dropped_while_the_inbox_is_backed_up():
    # The broker's flow control (receive maximum) holds back QoS 1 messages, not QoS 0 ones: a
    # flood of those while the loop is held up must not fill the memory.
    from types import SimpleNamespace

    box = Inbox(lambda: 0, qos0_backlog=3)
    for i in range(5):
        box.put(SimpleNamespace(topic=f"q0/{i}", qos=0))
    box.put(SimpleNamespace(topic="q1", qos=1))  # QoS 1 is bounded by the broker: always taken
    assert [m.topic for _, m in box.take(10, 0)] == ["q0/0", "q0/1", "q0/2", "q1"] and box.dropped_qos0 == 2
    box.put(SimpleNamespace(topic="q0/again", qos=0))
    assert len(box) == 1


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


def test_print_config_never_shows_a_password(capsys, monkeypatch):
    from pipeline.orchestration.cli import main

    monkeypatch.setenv("ADA_DDNN_MQTT_URL", "mqtts://site0-edge:hunter2@broker:8883")
    monkeypatch.setenv("ADA_DDNN_REDIS_URL", "redis://site0-edge:s3cret@redis:6379/0")
    assert main(["edge", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out
    assert "mqtts://site0-edge:***@broker:8883" in out and "redis://site0-edge:***@redis:6379/0" in out


@pytest.mark.services
def test_a_plain_url_on_a_port_that_closes_at_once_fails_fast():
    """A TLS listener hangs up on a plain MQTT CONNECT: the first connect says so at once instead
    of waiting out its timeout. A server that accepts and closes stands in for it."""
    import socket

    from pipeline.errors import ConnectError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def hang_up():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    t0 = time.monotonic()
    c = MqttClient(f"mqtt://127.0.0.1:{port}", "hang-up")
    try:
        with pytest.raises(ConnectError, match="closed before answering"):
            c.connect(timeout_s=20)
    finally:
        stop.set()
        t.join()
        srv.close()
    assert time.monotonic() - t0 < 10


@pytest.mark.services
def test_acknowledged_publishes_are_forgotten_without_anyone_asking(brokers, site):
    from pipeline.transport.mqtt_client import PRUNE_EVERY

    c = MqttClient(brokers[0], f"{site}-prune").connect()
    try:
        for _ in range(10):  # in waves, each acknowledged by the broker before the next
            for _ in range(PRUNE_EVERY // 2):
                assert c.publish(f"ada/{site}/test", b"x")
            c._pending[-1].wait_for_publish(10)
        assert len(c._pending) < 3 * PRUNE_EVERY  # pruned on the way, not kept until `unconfirmed` is read
        assert c.wait_confirmed(10) and c.unconfirmed == 0
    finally:
        c.close()


@pytest.mark.services
@pytest.mark.parametrize("resend_s", [10.0, 0.0], ids=["resend", "no-resend"])
def test_acknowledged_publishes_a_killed_broker_lost_are_sent_again(tmp_path, resend_s):
    # A subscriber's persistent session is saved (graceful restart); then, while it is away, 50
    # messages are published and acknowledged, and the broker is SIGKILLed before it saves them
    # (autosave once an hour). After the restart only the publisher's resend brings them back.
    from tests.faults.harness import Mosquitto, wait_until

    broker = Mosquitto(tmp_path / "mosquitto", autosave_interval_s=3600).start()
    got: list[bytes] = []
    try:
        sub = MqttClient(broker.url, "resend-sub", on_message=lambda m: got.append(m.payload),
                         on_connect=lambda c: c.subscribe("t/resend", qos=1), session_expiry_s=600).connect()
        sub.close()
        broker.terminate()  # a clean stop saves the subscriber's session
        broker.start()
        pub = MqttClient(broker.url, "resend-pub", resend_s=resend_s).connect()
        for i in range(50):
            assert pub.publish("t/resend", str(i).encode(), qos=1)
        assert pub.wait_confirmed(10)
        broker.restart(down_s=0.2)  # SIGKILL: the 50 queued for the subscriber were never saved
        wait_until(lambda: pub.connected.is_set() and pub.reconnects == 1, 30, "the publisher's reconnect")
        sub = MqttClient(broker.url, "resend-sub", on_message=lambda m: got.append(m.payload),
                         on_connect=lambda c: c.subscribe("t/resend", qos=1), session_expiry_s=600).connect()
        if resend_s:
            wait_until(lambda: len(set(got)) == 50, 10, "the 50 messages")
            assert sorted(set(got), key=int) == [str(i).encode() for i in range(50)]
            assert pub.resent == 50 and pub.wait_confirmed(10)
        else:
            marker = pub.publish("t/resend", b"marker", qos=1)
            assert marker
            wait_until(lambda: b"marker" in got, 10, "the marker")
            assert got == [b"marker"] and pub.resent == 0  # the 50 are gone without the resend
        pub.close()
        sub.close()
    finally:
        broker.terminate()


@pytest.mark.services
@pytest.mark.parametrize("hold", [True, False], ids=["held", "at-once"])
def test_a_held_resend_reaches_a_receiver_whose_session_the_broker_lost(tmp_path, hold):
    # The receiver's session and the 20 messages queued for it die with a SIGKILLed broker (nothing
    # saved). The publisher reconnects first; the receiver, with a new session, subscribes later.
    # A resend made at the reconnect goes nowhere, and so do the 5 messages published before the
    # receiver is back; a held one, released when the receiver is back, brings all 25.
    from tests.faults.harness import Mosquitto, wait_until

    broker = Mosquitto(tmp_path / "mosquitto", autosave_interval_s=3600).start()
    got: list[bytes] = []
    ready = threading.Event()

    def receiver() -> MqttClient:  # both topics in one SUBSCRIBE: a message on t/ready means t/held is on too
        return MqttClient(broker.url, "held-sub",
                          on_message=lambda m: ready.set() if m.topic == "t/ready" else got.append(m.payload),
                          on_connect=lambda c: c.subscribe([("t/held", 1), ("t/ready", 1)]),
                          session_expiry_s=600).connect()

    def subscribed(pinger: MqttClient) -> bool:
        pinger.publish("t/ready", b"", qos=1)
        return ready.wait(0.1)

    try:
        receiver().close()  # its session waits in the broker's memory
        pub = MqttClient(broker.url, "held-pub", resend_s=10.0, resend_after=30.0 if hold else 0.0).connect()
        for i in range(20):
            assert pub.publish("t/held", str(i).encode(), qos=1)
        assert pub.wait_confirmed(10)
        broker.restart(down_s=0.2)  # SIGKILL: the session and its 20 messages are gone
        wait_until(lambda: pub.connected.is_set() and pub.reconnects == 1, 30, "the publisher's reconnect")
        for i in range(20, 25):
            assert pub.publish("t/held", str(i).encode(), qos=1)
        assert pub.wait_confirmed(10)  # acknowledged, and dropped: nobody subscribes yet
        sub = receiver()
        pinger = MqttClient(broker.url, "held-ping").connect()  # of its own: what pub sends counts as resent
        wait_until(lambda: subscribed(pinger), 10, "the receiver's subscription")
        pinger.close()
        pub.release_resend()  # the caller's sign that a receiver is back
        if hold:
            wait_until(lambda: len(set(got)) == 25, 10, "the 25 messages")
            assert sorted(set(got), key=int) == [str(i).encode() for i in range(25)] and pub.resent == 25
        else:
            assert pub.publish("t/held", b"marker", qos=1)
            wait_until(lambda: b"marker" in got, 10, "the marker")
            assert got == [b"marker"]  # the resend at the reconnect found no subscriber
        pub.close()
        sub.close()
    finally:
        broker.terminate()
