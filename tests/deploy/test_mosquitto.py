"""The shipped broker edge (deploy/mosquitto/): identity bound to the user name, per-fleet scoping,
packet size cap. A real Mosquitto runs the shipped mosquitto.conf and the acl rendered from the
shipped inventory; every refusal is shown by the MQTT 5 reason code the broker sends."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from needs import need_binary
from servers import free_port

from edge_sdk.cli import main
from edge_sdk.cloud.acl import load_inventory, render_acl
from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Message, TlsConfig, Transport, TransportConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
P1, P2 = Topics("plant1"), Topics("plant2")
PASSWORDS = {"cam-1": "pw1", "cam-2": "pw2", "cam-9": "pw9"}
SERVICES = {"ingest": "pwi", "publisher": "pwp"}


class Inbox:
    def __init__(self) -> None:
        self.items: list[Message] = []
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.items.append(message)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Message]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)

    def topics(self) -> set[str]:
        with self._cond:
            return {m.topic for m in self.items}


@pytest.fixture
def fleet_broker(mosquitto_factory, tmp_path: Path, make_certs):
    """The shipped config on two loopback ports: ``broker.port`` (devices) and ``broker.services``."""
    passwd_exe = str(need_binary("mosquitto_passwd"))
    ca = make_certs(tmp_path, clients=())
    for name, users in (("passwd", PASSWORDS), ("passwd.services", SERVICES)):
        for i, (user, pw) in enumerate(users.items()):
            subprocess.run([passwd_exe, "-b", *(["-c"] if i == 0 else []), str(tmp_path / name), user, pw],
                           check=True, capture_output=True)
    (tmp_path / "acl").write_text(render_acl(load_inventory(DEPLOY / "fleets.yaml")))
    broker = mosquitto_factory(start=False)
    broker.services = free_port()
    conf = ((DEPLOY / "mosquitto.conf").read_text()
            .replace("listener 8883", f"listener {broker.port} 127.0.0.1")
            .replace("listener 8884", f"listener {broker.services} 127.0.0.1")
            .replace("/etc/mosquitto/certs/", f"{tmp_path}/").replace("/etc/mosquitto/", f"{tmp_path}/")
            .replace("/var/lib/mosquitto/", f"{broker.folder / 'data'}/"))
    broker.conf_path.write_text(conf + f"\nuser root\nlog_dest file {broker.log_path}\n")
    broker.ca = ca
    return broker.start()


def client(broker, user: str, client_id: str | None = None, services: bool = False, pw: str | None = None) -> Transport:
    pw = pw or {**PASSWORDS, **SERVICES}[user]
    url = f"mqtts://{user}:{pw}@127.0.0.1:{broker.services if services else broker.port}"
    return Transport(TransportConfig.from_url(url, client_id=client_id or user, tls=TlsConfig(ca=broker.ca),
                                              reconnect_min_s=0.05, reconnect_max_s=0.3))


def refused(transport: Transport, topic: str, payload: bytes = b"{}", retain: bool = False) -> str:
    with pytest.raises(SyncError) as info:
        transport.publish(topic, payload, qos=1, retain=retain, wait=5)
    return str(info.value)


def test_shipped_acl_is_what_the_inventory_renders() -> None:
    assert (DEPLOY / "acl").read_text() == render_acl(load_inventory(DEPLOY / "fleets.yaml"))
    conf = (DEPLOY / "mosquitto.conf").read_text()
    devices = conf[conf.index("listener 8883"):conf.index("listener 8884")]
    assert "use_username_as_clientid true" in devices and "allow_anonymous false" in devices
    assert "%c" not in (DEPLOY / "acl").read_text()


def test_inventory_refuses_a_device_in_two_fleets(tmp_path: Path) -> None:
    bad = tmp_path / "fleets.yaml"
    bad.write_text("fleets:\n  a: {devices: [cam-1]}\n  b: {devices: [cam-1]}\n")
    with pytest.raises(ConfigError, match="cam-1.*already in fleet 'a'"):
        load_inventory(bad)
    bad.write_text("fleets:\n  a: {devices: [desired]}\n")
    with pytest.raises(ConfigError, match="reserved"):
        load_inventory(bad)


def test_cloud_acl_command_writes_the_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["cloud", "acl", str(DEPLOY / "fleets.yaml"), "-o", str(tmp_path / "acl")])
    assert done.value.code == 0
    assert (tmp_path / "acl").read_text() == (DEPLOY / "acl").read_text()


def test_another_devices_password_gets_neither_its_topics_nor_its_session(fleet_broker) -> None:
    """cam-1's password with client id cam-2: the broker makes it client cam-1, so it can neither
    publish nor read cam-2's topics, and the real cam-2 stays connected."""
    real_acks, real_desired, impostor_got, ingest_got = Inbox(), Inbox(), Inbox(), Inbox()
    cam2 = client(fleet_broker, "cam-2")
    cam2.subscribe(P1.telemetry_ack("cam-2"), real_acks)
    cam2.subscribe(P1.desired("cam-2"), real_desired)
    ingest = client(fleet_broker, "ingest", "ingest-1", services=True)
    ingest.subscribe(P1.telemetry_shared("g"), ingest_got)
    ops = client(fleet_broker, "publisher", "ops-1", services=True)
    impostor = client(fleet_broker, "cam-1", client_id="cam-2")
    for topic in (P1.telemetry_ack("cam-2"), P1.desired("cam-2"), P1.reported("cam-2"), P1.status("cam-2")):
        impostor.subscribe(topic, impostor_got)
    with cam2, ingest, ops:
        assert cam2.wait_connected(10) and ingest.wait_connected(10) and ops.wait_connected(10)
        with impostor:
            assert impostor.wait_connected(10), impostor.last_error
            time.sleep(0.5)
            assert cam2.connected and cam2.connects == 1  # not kicked off by the same client id
            for topic in (P1.telemetry("cam-2"), P1.status("cam-2"), P1.reported("cam-2")):
                assert "Not authorized" in refused(impostor, topic)  # PUBACK reason 0x87
            assert ops.publish(P1.desired("cam-2"), b'{"version": 2}', qos=1, retain=True, wait=5)
            assert ingest.publish(P1.telemetry_ack("cam-2"), b'{"upto": 5}', qos=1, wait=5)
            assert real_desired.wait_for(1) and real_acks.wait_for(1)
            # what the impostor may do is what cam-1 may do, under cam-1's name
            assert impostor.publish(P1.telemetry("cam-1"), b"cam-1 batch", qos=1, wait=5)
            assert [m.topic for m in ingest_got.wait_for(1)] == [P1.telemetry("cam-1")]
            time.sleep(0.3)
        assert impostor_got.items == []
        assert cam2.connected and cam2.connects == 1
        assert [m.topic for m in ingest_got.items] == [P1.telemetry("cam-1")]


def test_a_device_sees_and_writes_only_its_own_fleet(fleet_broker) -> None:
    got = Inbox()
    cam1 = client(fleet_broker, "cam-1")
    for t in (P1, P2):
        cam1.subscribe(t.all_manifests(), got)
        cam1.subscribe(t.all_blobs(), got)
        cam1.subscribe(t.all_trust_roots(), got)
        cam1.subscribe(t.desired(), got)
    ops = client(fleet_broker, "publisher", "ops-1", services=True)
    sha = "ab" * 32
    with ops, cam1:
        assert ops.wait_connected(10) and cam1.wait_connected(10)
        time.sleep(0.3)
        for t in (P2, P1):  # plant2 first: if it leaked it would arrive before plant1's
            for topic in (t.manifest("cnn", 3), t.blob(sha), t.trust_root(2), t.desired()):
                assert ops.publish(topic, b"x", qos=1, retain=True, wait=5)
        got.wait_for(4)
        time.sleep(0.3)
        assert got.topics() == {P1.manifest("cnn", 3), P1.blob(sha), P1.trust_root(2), P1.desired()}
        # its own name in another fleet, any desired state, its own acks, release data: denied
        for topic in (P2.telemetry("cam-1"), P2.reported("cam-1"), P1.desired(), P1.desired("cam-1"),
                      P1.telemetry_ack("cam-1"), P1.blob(sha), P1.manifest("cnn", 4), P1.trust_root(3)):
            assert "Not authorized" in refused(cam1, topic)
        assert cam1.refused == 8


def test_device_passwords_do_not_work_on_the_services_listener_nor_wrong_ones_anywhere(fleet_broker) -> None:
    for t in (client(fleet_broker, "cam-1", "ingest-7", services=True), client(fleet_broker, "cam-9", pw="nope")):
        t.start()
        assert not t.wait_connected(1.5)
        t.stop()
        assert "refused the connection: Not authorized" in t.last_error  # CONNACK reason 0x87


def test_several_ingest_workers_share_one_service_user(fleet_broker) -> None:
    workers = [client(fleet_broker, "ingest", f"ingest-{i}", services=True) for i in range(2)]
    for w in workers:
        w.start()
    try:
        assert all(w.wait_connected(10) for w in workers)
        time.sleep(0.5)
        assert all(w.connected and w.connects == 1 for w in workers)
    finally:
        for w in workers:
            w.stop()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


def test_an_oversized_packet_is_refused_from_its_header_with_reason_0x95(fleet_broker) -> None:
    """A PUBLISH that declares more than max_packet_size: the broker answers DISCONNECT 0x95
    ("Packet too large") after reading only the fixed header, and the client may reconnect."""
    import ssl

    context = ssl.create_default_context(cafile=str(fleet_broker.ca))
    with socket.create_connection(("127.0.0.1", fleet_broker.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        body = (_field("MQTT") + bytes([5, 0xC2]) + (30).to_bytes(2, "big") + b"\x00"
                + _field("cam-1") + _field("cam-1") + _field(PASSWORDS["cam-1"]))
        conn.sendall(b"\x10" + _varint(len(body)) + body)
        connack = conn.recv(64)
        assert connack[0] == 0x20 and connack[3] == 0x00  # CONNACK, success
        topic = _field(P1.telemetry("cam-1"))
        conn.sendall(b"\x30" + _varint(len(topic) + 1 + (8 << 20)) + topic + b"\x00")  # declares 8 MiB, sends none
        disconnect = conn.recv(64)
    assert disconnect[0] == 0xE0 and disconnect[2] == 0x95, disconnect
    got = Inbox()
    ingest = client(fleet_broker, "ingest", "ingest-1", services=True)
    ingest.subscribe(P1.telemetry_shared("g"), got)
    cam1 = client(fleet_broker, "cam-1")
    with ingest, cam1:
        assert ingest.wait_connected(10) and cam1.wait_connected(10)
        time.sleep(0.2)
        assert cam1.publish(P1.telemetry("cam-1"), b"x" * (1 << 20), qos=1, wait=5)  # under the cap
        assert [len(m.payload) for m in got.wait_for(1)] == [1 << 20]
