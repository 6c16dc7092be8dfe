"""The field deployment's broker keeps every MQTT user on its own topics.

A private Mosquitto runs the shipped `docker/mosquitto.conf` with only its listeners and file
paths rewritten for this machine, the shipped `docker/mosquitto.acl` as it is, and a password
file made by the shipped `docker/make-passwords.sh` (which also writes the env files the compose
services read; the clients here take their URLs from them). The TLS listener the config ships
commented out is switched on too (with a throwaway CA) when `openssl` is on PATH.

Negative checks never wait for a timeout: a denied QoS 1 publish is answered by a PUBACK with
reason 0x87 only after the broker has routed (or dropped) it, and the broker writes a client's
packets in order, so a message the broker had routed to a subscriber is in its inbox by the time
a later message or acknowledgement reaches that subscriber (`Probe.barrier`).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from pipeline.errors import ConnectError, ServiceError
from pipeline.transport.embedded import free_port, wait_for_port
from pipeline.transport.mqtt_client import MqttClient, parse_mqtt_url
from pipeline.wire import names

pytestmark = pytest.mark.services

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SITE = "site0"  # docker/mosquitto.acl is the ACL of site0
NOT_AUTHORIZED = 0x87
WAIT_S = 5.0  # bound on waiting for something that must happen
BARRIER_TOPIC = f"ada/{SITE}/barrier"  # nobody may publish here: every publish is answered 0x87

# Every topic of pipeline/wire/names.py, one instance each, and who may publish / receive it.
OBS2, OBS3 = names.obs_topic(SITE, 2), names.obs_topic(SITE, 3)
SHED2, SHED3 = names.shed_topic(SITE, 2), names.shed_topic(SITE, 3)
STATUS2, STATUS3 = names.status_topic(SITE, 2), names.status_topic(SITE, 3)
RESULTS, CLOCK = names.results_topic(SITE), names.clock_topic(SITE)
FLOW = names.flow_topic(SITE, "edge-host-1-abc123")
FEAT2, FEAT3 = names.features_topic(SITE, 2), names.features_topic(SITE, 3)  # lazy upload: features on request
REQUEST = names.request_topic(SITE)
OTHER_SITE = names.obs_topic("site1", 2)
TOPICS = (OBS2, OBS3, SHED2, SHED3, STATUS2, STATUS3, RESULTS, CLOCK, FLOW, FEAT2, FEAT3, REQUEST, OTHER_SITE)
MAY_PUBLISH = {
    "cam2": {OBS2, FEAT2, SHED2, STATUS2, CLOCK},
    "edge": {RESULTS, FLOW, REQUEST},
    "cloud": {RESULTS},
    "monitor": set(),
}
MAY_RECEIVE = {
    "cam2": {CLOCK, FLOW, REQUEST},
    "edge": {OBS2, OBS3, FEAT2, FEAT3, SHED2, SHED3},
    "cloud": set(),
    "monitor": {RESULTS, STATUS2, STATUS3, CLOCK, FLOW},
}
WRITER = {OBS2: "cam2", OBS3: "cam3", SHED2: "cam2", SHED3: "cam3", STATUS2: "cam2", STATUS3: "cam3",
          RESULTS: "cloud", CLOCK: "cam2", FLOW: "edge", FEAT2: "cam2", FEAT3: "cam3",
          REQUEST: "edge"}  # who publishes each topic in the field
TOPIC_BUILDERS = {"obs_topic", "shed_topic", "status_topic", "results_topic", "clock_topic", "flow_topic",
                  "features_topic", "request_topic"}


@dataclass
class Broker:
    port: int
    tls_port: int | None  # None without openssl
    ca: Path | None
    secrets: Path

    def env(self, role: str) -> dict[str, str]:
        """The env file make-passwords.sh wrote for `role` (cam0 .. cam5, edge, cloud, monitor)."""
        lines = (self.secrets / f"{role}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    def url(self, role: str) -> str:
        return self.env(role)["ADA_DDNN_MQTT_URL"]

    def password(self, role: str) -> str:
        password = parse_mqtt_url(self.url(role)).password
        assert password, f"no password in {role}.env"
        return password


def broker_config(port: int, tls_port: int | None, passwd: Path, acl: Path, data: Path, certs: Path) -> str:
    """docker/mosquitto.conf with the listeners on 127.0.0.1 and the files at these paths; every
    other line as shipped. The TLS block (shipped commented out) is switched on when tls_port is set."""
    rewrites = {"listener": f"listener {port} 127.0.0.1", "password_file": f"password_file {passwd}",
                "acl_file": f"acl_file {acl}", "persistence_location": f"persistence_location {data}/"}
    tls = {"#listener": f"listener {tls_port} 127.0.0.1", "#cafile": f"cafile {certs / 'ca.pem'}",
           "#certfile": f"certfile {certs / 'server.pem'}", "#keyfile": f"keyfile {certs / 'server.key'}",
           "#tls_version": "tls_version tlsv1.2"}
    out, seen = [], []
    for line in (DOCKER / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in rewrites:
            out.append(rewrites[key])
        elif tls_port is not None and key in tls:
            out.append(tls[key])
        else:
            out.append(line)
            continue
        seen.append(key)
    wanted = sorted(rewrites) + (sorted(tls) if tls_port is not None else [])
    assert sorted(seen) == sorted(wanted), f"docker/mosquitto.conf: expected each of {wanted} once, found {seen}"
    if os.geteuid() == 0:
        # As root, Mosquitto switches to user `mosquitto`, who may not read pytest's private tmp dirs.
        out.append("user root")
    return "\n".join(out) + "\n"


def make_certs(certs: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    certs.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ada-ddnn test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (certs / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    missing = [exe for exe in ("mosquitto", "mosquitto_passwd") if shutil.which(exe) is None]
    if missing:
        reason = f"{' and '.join(missing)} not on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"broker tests must run in CI: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("broker-acl")
    port = free_port()
    secrets = work / "secrets"
    made = subprocess.run(["bash", str(DOCKER / "make-passwords.sh"), SITE, str(secrets)], check=False,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(port)})
    assert made.returncode == 0, f"docker/make-passwords.sh failed:\n{made.stdout}{made.stderr}"
    tls_port = None
    if shutil.which("openssl"):
        try:
            make_certs(work / "certs")
            tls_port = free_port()
            while tls_port == port:
                tls_port = free_port()
        except subprocess.CalledProcessError as err:  # e.g. an openssl without these options: no TLS listener
            print(f"no TLS listener: openssl failed: {err.stderr!r}")
    (work / "data").mkdir()
    conf = work / "mosquitto.conf"
    conf.write_text(broker_config(port, tls_port, secrets / "mosquitto.passwd", DOCKER / "mosquitto.acl",
                                work / "data", work / "certs"))
    log_path = work / "mosquitto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for_port("127.0.0.1", port, 15, proc)
            if tls_port is not None:
                wait_for_port("127.0.0.1", tls_port, 15, proc)
        except ServiceError as err:
            pytest.fail(f"mosquitto did not start: {err}\n{log_path.read_text(errors='replace')[-2000:]}")
        yield Broker(port, tls_port, work / "certs" / "ca.pem" if tls_port else None, secrets)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Probe:
    """A raw paho MQTT v5 client logged in as `SITE-<role>` (or anonymous) that records the
    broker's CONNACK, SUBACK and PUBACK reason codes and every message it receives."""

    def __init__(self, broker: Broker, role: str | None, *, will: tuple[str, bytes] | None = None,
                 client_id: str | None = None) -> None:
        self._cond = threading.Condition()
        self.connack = None  # ReasonCode of the CONNACK
        self._acks: dict[int, object] = {}  # mid -> PUBACK reason code, or SUBACK reason codes
        self.messages: list[tuple[str, bytes]] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{role}-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(min_delay=60, max_delay=60)  # a probe never reconnects within a test
        if role is not None:
            c.username_pw_set(f"{SITE}-{role}", broker.password(role))
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.client = c
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert self._wait(lambda: self.connack is not None), f"no CONNACK for {role}"

    def _on_connect(self, c, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.connack = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, c, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._acks[mid] = reason_codes
            self._cond.notify_all()

    def _on_publish(self, c, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, c, userdata, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def _wait(self, ready) -> bool:
        with self._cond:
            return self._cond.wait_for(ready, timeout=WAIT_S)

    def _ack(self, mid: int):
        assert self._wait(lambda: mid in self._acks), f"no acknowledgement of mid {mid} within {WAIT_S} s"
        with self._cond:
            return self._acks.pop(mid)

    @property
    def refused(self) -> bool:
        return self.connack is not None and self.connack.is_failure

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code (1: granted QoS 1; 0x87: not authorized)."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._ack(mid)[0].value

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish with QoS 1 and return the PUBACK reason code (0x87: not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        return self._ack(info.mid).value

    def barrier(self) -> None:
        """Once this returns, every message the broker routed to this client before is in `messages`."""
        assert self.publish(BARRIER_TOPIC, b"") == NOT_AUTHORIZED

    def wait_for(self, topic: str, payload: bytes) -> bool:
        return self._wait(lambda: (topic, payload) in self.messages)

    def received(self, payload: bytes) -> set[str]:
        """Topics on which this payload arrived."""
        with self._cond:
            return {t for t, p in self.messages if p == payload}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes(broker):
    """probe(role, **options): a connected Probe, closed after the test."""
    made: list[Probe] = []

    def probe(role: str | None, **options) -> Probe:
        p = Probe(broker, role, **options)
        made.append(p)
        return p

    yield probe
    for p in made:
        p.close()


def token() -> bytes:
    return uuid.uuid4().hex.encode()


# --- the shipped files ----------------------------------------------------------------------

def test_shipped_acl_is_what_the_script_writes_for_site0(broker):
    assert (broker.secrets / "mosquitto.acl").read_text() == (DOCKER / "mosquitto.acl").read_text(), \
        "docker/mosquitto.acl is stale: regenerate it with docker/make-passwords.sh site0 DIR"


def test_every_topic_of_names_is_in_the_acl_tables():
    builders = {name for name in vars(names) if name.endswith("_topic")}
    assert builders == TOPIC_BUILDERS, (
        f"pipeline/wire/names.py builds topics {sorted(builders ^ TOPIC_BUILDERS)} this test does not know: grant "
        "them in docker/make-passwords.sh (and regenerate docker/mosquitto.acl), then add them to the tables here")
    rules = [line.split()[2] for line in (DOCKER / "mosquitto.acl").read_text().splitlines()
             if line.startswith("topic ")]
    for topic in WRITER:
        assert any(mqtt.topic_matches_sub(rule, topic) for rule in rules), f"no rule of docker/mosquitto.acl covers {topic}"


def test_password_file_holds_only_hashes(broker):
    passwd = (broker.secrets / "mosquitto.passwd").read_text()
    for role in ("cam0", "cam5", "edge", "cloud", "monitor"):
        assert f"{SITE}-{role}:$7$" in passwd  # PBKDF2-SHA512
        assert broker.password(role) not in passwd
    assert len({broker.password(r) for r in ("cam0", "cam1", "edge", "cloud", "monitor")}) == 5
    assert broker.env("edge")["ADA_DDNN_SHARE_GROUP"] != names.SHARE_GROUP


# --- logins ---------------------------------------------------------------------------------

def test_anonymous_client_is_refused(broker, probes):
    anonymous = probes(None)
    assert anonymous.refused, f"anonymous CONNACK: {anonymous.connack}"
    with pytest.raises(ConnectError, match="refused .*no login in the URL"):
        MqttClient(f"mqtt://127.0.0.1:{broker.port}", "t-anonymous").connect(timeout_s=10)


def test_wrong_password_raises_connect_error_at_once(broker):
    start = time.monotonic()
    with pytest.raises(ConnectError, match="refused .*'site0-cam2': a wrong password"):
        MqttClient(f"mqtt://{SITE}-cam2:not-the-password@127.0.0.1:{broker.port}", "t-cam2").connect(timeout_s=10)
    assert time.monotonic() - start < 5
    with pytest.raises(ConnectError, match="refused"):  # another camera's password is no better
        MqttClient(f"mqtt://{SITE}-cam2:{broker.password('cam3')}@127.0.0.1:{broker.port}", "t-cam2").connect(timeout_s=10)
    good = MqttClient(broker.url("cam2"), "t-cam2", will=(STATUS2, b"offline")).connect(timeout_s=10)
    good.close()


# --- who may publish and receive what -------------------------------------------------------

def test_camera_publishes_only_on_its_own_observation_topic(broker, probes):
    group = broker.env("edge")["ADA_DDNN_SHARE_GROUP"]
    edge = probes("edge")
    assert edge.subscribe(names.shared_obs_filter(SITE, group)) == 1  # what the aggregators subscribe
    cam2 = probes("cam2", will=(STATUS2, b"offline"))
    forged, own = token(), token()
    assert cam2.publish(OBS3, forged) == NOT_AUTHORIZED
    assert cam2.publish(OBS2, own) == 0
    assert edge.wait_for(OBS2, own)
    assert edge.received(forged) == set()  # routed before `own` on the same connection: it would be here


def test_camera_cannot_publish_results(broker, probes):
    monitor = probes("monitor")
    assert monitor.subscribe(RESULTS) == 1
    cam2 = probes("cam2")
    forged, by_edge, by_cloud = token(), token(), token()
    assert cam2.publish(RESULTS, forged) == NOT_AUTHORIZED
    assert probes("edge").publish(RESULTS, by_edge) == 0  # the owners may
    assert probes("cloud").publish(RESULTS, by_cloud) == 0
    assert monitor.wait_for(RESULTS, by_edge) and monitor.wait_for(RESULTS, by_cloud)
    assert monitor.received(forged) == set()


def test_camera_cannot_set_another_cameras_status_nor_last_will(broker, probes):
    monitor = probes("monitor")
    assert monitor.subscribe(names.status_filter(SITE)) == 1
    forged, forged_will, own_will = token(), token(), token()
    assert probes("cam2").publish(STATUS3, forged, retain=True) == NOT_AUTHORIZED

    def will_sent(will: tuple[str, bytes]) -> bool:
        """Connect as camera 2 with `will`, then take its session over with another connection
        of the same client id: the broker sends the will before it answers the second CONNECT.
        False when the broker refused the first connection (a will it does not allow)."""
        cid = f"{SITE}-cam2-{uuid.uuid4().hex[:8]}"
        first = probes("cam2", will=will, client_id=cid)
        if first.refused:
            return False
        assert not probes("cam2", client_id=cid).refused
        return True

    assert will_sent((STATUS2, own_will)) and monitor.wait_for(STATUS2, own_will)  # its own will works
    will_sent((STATUS3, forged_will))  # a will on camera 3's status: refused at CONNECT or never sent
    monitor.barrier()
    assert monitor.received(forged) == set() and monitor.received(forged_will) == set()


def test_cloud_cannot_read_observations(broker, probes):
    cloud, edge = probes("cloud"), probes("edge")
    # Mosquitto's ACL file grants every SUBSCRIBE (QoS 1) and filters at delivery; a plugin may answer 0x87.
    assert cloud.subscribe(names.obs_filter(SITE)) in (1, NOT_AUTHORIZED)
    assert cloud.subscribe("ada/#") in (1, NOT_AUTHORIZED)
    assert edge.subscribe(names.obs_filter(SITE)) == 1
    obs = token()
    assert probes("cam2").publish(OBS2, obs) == 0
    assert edge.wait_for(OBS2, obs)
    cloud.barrier()
    assert cloud.received(obs) == set()


def test_each_user_publishes_only_where_it_may(probes):
    wrong = []
    for role, allowed in MAY_PUBLISH.items():
        p = probes(role)
        for topic in TOPICS:
            code = p.publish(topic, b"")
            if (code < 0x80) != (topic in allowed):
                wrong.append(f"{role} -> {topic}: {code:#x}")
    assert not wrong, "publish rights differ from the design:\n" + "\n".join(wrong)


def test_each_user_receives_only_what_it_may(probes):
    readers = {role: probes(role) for role in MAY_RECEIVE}
    for p in readers.values():
        assert p.subscribe("ada/#") in (1, NOT_AUTHORIZED)
    writers = {role: probes(role) for role in set(WRITER.values())}
    payload = token()
    for topic, role in WRITER.items():
        assert writers[role].publish(topic, payload) < 0x80, f"{role} may publish {topic}"
    wrong = []
    for role, p in readers.items():
        p.barrier()
        got = p.received(payload)
        if got != MAY_RECEIVE[role]:
            wrong.append(f"{role}: received {sorted(got)}, may receive {sorted(MAY_RECEIVE[role])}")
    assert not wrong, "read rights differ from the design:\n" + "\n".join(wrong)


def test_monitor_may_publish_nothing(probes):
    monitor = probes("monitor")
    assert monitor.publish(RESULTS, b"") == NOT_AUTHORIZED
    assert monitor.publish(CLOCK, b"", retain=True) == NOT_AUTHORIZED


# --- TLS --------------------------------------------------------------------------------------

def test_tls_listener_with_camera_credentials(broker, probes):
    if broker.tls_port is None:
        pytest.skip("no openssl (or one that cannot make the test certificates): no TLS listener")
    edge = probes("edge")
    assert edge.subscribe(names.obs_filter(SITE)) == 1
    url = f"mqtts://{SITE}-cam2:{broker.password('cam2')}@127.0.0.1:{broker.tls_port}?ca={broker.ca}"
    cam2 = MqttClient(url, "t-cam2-tls", will=(STATUS2, b"offline")).connect(timeout_s=10)
    try:
        obs = token()
        assert cam2.publish(OBS2, obs)
        assert cam2.wait_confirmed(WAIT_S)
        assert edge.wait_for(OBS2, obs)
    finally:
        cam2.close()
    # Only the deployment's CA vouches for the broker. (Checked with the ssl module: paho 2.2 leaves
    # the socket of a failed handshake open, which this suite's filterwarnings=error would report.)
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=WAIT_S) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with pytest.raises(ConnectError, match="refused"):
        MqttClient(f"mqtts://{SITE}-cam2:wrong@127.0.0.1:{broker.tls_port}?ca={broker.ca}", "t-cam2-tls").connect(timeout_s=10)



def test_a_camera_whose_publishes_the_acl_refuses_says_so_and_fails(broker, stream_setup, caplog):
    """Camera 3 run with camera 2's login: the broker acknowledges each publish with a refusal, so
    nothing it captured reaches anyone; the run must end as a failure, not as 'N observations'."""
    from devices.camera import CameraConfig, CameraFeed

    _, model, data, _, _ = stream_setup
    cfg = CameraConfig(site=SITE, mqtt_url=broker.url("cam2"), cameras=(3,), start=0, stop=3, fps=0.0, upload="eager")
    feed = CameraFeed(cfg, {3: model.cameras[3]}, data.test)
    feed.connect()
    try:
        stats = feed.run()
    finally:
        with caplog.at_level("ERROR", logger="devices.camera"):
            feed.close()
    assert stats.frames == 3 and stats.denied >= 3  # three observations and the final status, all refused
    assert "the broker refused" in caplog.text and "camera 3" in caplog.text
