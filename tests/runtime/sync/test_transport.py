"""Transport against a real Mosquitto: ack waits, sessions, Last Will, restarts, ACL refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import OFFLINE, ONLINE, Message, Transport, TransportConfig
from polling import wait_until

T = Topics("f")


def make(broker, client_id: str, **kw) -> Transport:
    cfg = TransportConfig.from_url(broker.url, client_id=client_id, reconnect_min_s=0.05, reconnect_max_s=0.3, **kw)
    return Transport(cfg)


class Inbox:
    """Collects messages from a handler thread; ``wait_for(n)`` blocks until n arrived."""

    def __init__(self) -> None:
        self.items: list[Message] = []
        self.cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self.cond:
            self.items.append(message)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Message]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)


def test_url_parsing_and_bad_urls():
    cfg = TransportConfig.from_url("mqtt://u%40x:p%3Aw@broker.local:1999", client_id="d1")
    assert (cfg.host, cfg.port, cfg.username, cfg.password) == ("broker.local", 1999, "u@x", "p:w")
    assert TransportConfig.from_url("mqtt://h", client_id="d").port == 1883
    for bad in ("http://h", "mqtt://", "mqtt://h:notaport", "mqtts://h"):
        with pytest.raises(ConfigError):
            TransportConfig.from_url(bad, client_id="d")
    with pytest.raises(ConfigError):
        TransportConfig.from_url("mqtt://h", client_id="")
    with pytest.raises(ConfigError, match="QoS"):
        Transport(TransportConfig.from_url("mqtt://h", client_id="d")).publish("a", b"x", qos=3)


def test_publish_waits_for_ack_and_handlers_are_isolated(mosquitto):
    inbox = Inbox()
    sub = make(mosquitto, "sub")
    sub.subscribe("edge/f/#", lambda m: 1 / 0)  # a broken handler on an overlapping filter …
    sub.subscribe("edge/f/+/telemetry", inbox)  # … must not starve the other, nor duplicate to it
    with sub:
        assert sub.wait_connected(5)
        time.sleep(0.2)  # SUBACK
        with make(mosquitto, "pub") as pub:
            assert pub.wait_connected(5)
            for i in range(20):
                assert pub.publish(T.telemetry("d1"), f"m{i}".encode(), qos=1, wait=5.0) is True
            assert pub.publish(T.telemetry("d2"), "text", qos=0, wait=5.0) is True
        got = inbox.wait_for(21)
        assert wait_until(lambda: sub.handler_errors == 21)
    # QoS 1 messages keep their order; the QoS 0 one may overtake them (MQTT orders per QoS).
    assert [m.payload for m in got if m.qos == 1] == [f"m{i}".encode() for i in range(20)]
    assert [m for m in got if m.qos == 0] == [Message(T.telemetry("d2"), b"text", 0, False)]
    assert sub.handler_errors == 21 and len(inbox.items) == 21
    with pytest.raises(SyncError, match="cannot publish"):
        make(mosquitto, "x").publish("edge/+/bad", b"", qos=1)


def test_status_online_retained_and_offline_on_clean_stop(mosquitto):
    status = T.status("d1")
    dev = make(mosquitto, "d1", status_topic=status)
    dev.start()
    assert dev.wait_connected(5)
    seen = Inbox()
    with make(mosquitto, "watcher") as w:
        w.subscribe(status, seen)
        assert [m.payload for m in seen.wait_for(1)][:1] == [ONLINE]
        dev.stop()
        assert seen.wait_for(2)[1].payload == OFFLINE
        assert not dev.connected


def test_last_will_when_device_process_is_killed(mosquitto):
    status = T.status("d9")
    code = textwrap.dedent(f"""
        import time
        from edge_sdk.runtime.sync.transport import Transport, TransportConfig
        t = Transport(TransportConfig.from_url({mosquitto.url!r}, client_id="d9", status_topic={status!r}))
        t.start(); assert t.wait_connected(5)
        t.publish("edge/f/d9/reported", b"{{}}", qos=1, retain=True, wait=5)
        print("up", flush=True); time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        seen = Inbox()
        with make(mosquitto, "watcher") as w:
            w.subscribe(status, seen)
            assert seen.wait_for(1)[0].payload == ONLINE
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            got = seen.wait_for(2)
            assert got[1].payload == OFFLINE and got[1].topic == status
    finally:
        proc.kill()
        proc.wait()
    # The will is retained: a late subscriber also learns the device is offline.
    late = Inbox()
    with make(mosquitto, "late") as w2:
        w2.subscribe(status, late)
        m = late.wait_for(1)[0]
    assert (m.payload, m.retain) == (OFFLINE, True)


def test_durable_session_keeps_qos1_messages_while_away(mosquitto):
    topic = T.telemetry_ack("d1")
    first = Inbox()
    dev = make(mosquitto, "d1", session_expiry_s=300)
    dev.subscribe(topic, first, qos=1)
    dev.start()
    assert dev.wait_connected(5)
    time.sleep(0.2)  # SUBACK
    dev.stop()
    with make(mosquitto, "cloud") as cloud:
        assert cloud.wait_connected(5)
        for i in range(5):
            assert cloud.publish(topic, str(i), qos=1, wait=5)
    # A new process with the same client id and no subscribe call yet: the broker kept the
    # session (subscription + queued messages), so they arrive as soon as it connects.
    later = Inbox()
    dev2 = make(mosquitto, "d1", session_expiry_s=300)
    dev2.subscribe(topic, later, qos=1)
    with dev2:
        got = later.wait_for(5)
    assert sorted(m.payload for m in got) == [b"0", b"1", b"2", b"3", b"4"]
    assert first.items == []


def test_zero_session_expiry_drops_messages_while_away(mosquitto):
    """The contrast case: with expiry 0 (clean_start=False alone) the broker forgets the session."""
    topic = T.telemetry_ack("d2")
    dev = make(mosquitto, "d2", session_expiry_s=0)
    dev.subscribe(topic, Inbox(), qos=1)
    dev.start()
    assert dev.wait_connected(5)
    time.sleep(0.2)
    dev.stop()
    with make(mosquitto, "cloud") as cloud:
        assert cloud.wait_connected(5)
        assert cloud.publish(topic, b"lost", qos=1, wait=5)
    later = Inbox()
    probe = make(mosquitto, "d2", session_expiry_s=0)
    probe.subscribe(topic, later, qos=1)
    with probe:
        assert probe.wait_connected(5)
        time.sleep(0.5)
    assert later.items == []


def test_offline_start_then_broker_appears_and_restarts(mosquitto_factory):
    broker = mosquitto_factory(start=False)
    states: list[bool] = []
    inbox = Inbox()
    dev = make(broker, "d1")
    dev.add_state_listener(states.append)
    dev.subscribe(T.telemetry_ack("d1"), inbox)
    dev.start()  # no broker at all: returns at once, keeps trying
    assert not dev.wait_connected(0.5)
    queued = dev.publish(T.reported("d1"), b"r1", qos=1, retain=True)  # kept by paho while offline
    assert queued is True
    broker.start()
    assert dev.wait_connected(10)
    broker.kill()  # SIGKILL mid-session
    assert wait_until(lambda: not dev.connected)
    broker.start()
    assert wait_until(lambda: dev.connects == 2)
    # subscriptions were renewed after the restart
    with make(broker, "cloud") as cloud:
        assert cloud.wait_connected(5)
        assert cloud.publish(T.telemetry_ack("d1"), b"after", qos=1, wait=5)
        assert inbox.wait_for(1)[0].payload == b"after"
    assert wait_until(lambda: dev.publish(T.reported("d1"), b"r2", qos=1, wait=2.0))
    dev.stop()
    assert states[:3] == [True, False, True]


def test_publish_denied_by_acl_raises_sync_error(mosquitto_factory, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite edge/+/%c/#\n")
    broker = mosquitto_factory(extra_conf=f"acl_file {acl}")
    with make(broker, "d1") as dev:
        assert dev.wait_connected(5)
        assert dev.publish(T.telemetry("d1"), b"mine", qos=1, wait=5)
        with pytest.raises(SyncError, match="(?i)not authori"):
            dev.publish(T.telemetry("d2"), b"not mine", qos=1, wait=5)
        assert dev.refused == 1


def test_shared_subscription_splits_messages_between_workers(mosquitto):
    inboxes = [Inbox(), Inbox()]
    workers = [make(mosquitto, f"w{i}") for i in range(2)]
    for w, box in zip(workers, inboxes):
        w.subscribe(T.telemetry_shared("ingest"), box)
        w.start()
        assert w.wait_connected(5)
    time.sleep(0.3)
    with make(mosquitto, "d1") as dev:
        assert dev.wait_connected(5)
        for i in range(40):
            dev.publish(T.telemetry("d1"), str(i), qos=1, wait=5)
    assert wait_until(lambda: sum(len(b.items) for b in inboxes) == 40)
    for w in workers:
        w.stop()
    payloads = sorted(int(m.payload) for b in inboxes for m in b.items)
    assert payloads == list(range(40))
    assert all(len(b.items) > 0 for b in inboxes)  # both workers took a share


# --- client-certificate auth (the shipped deploy/mosquitto config is tested in tests/deploy/) ------


def test_client_certificate_auth_device_and_cli(mosquitto_factory, tmp_path, make_certs):
    """``require_certificate`` + ``use_identity_as_username``: the certificate is the identity,
    for a device's Transport (TlsConfig.cert/key) and for the CLI (--cert/--key)."""
    from edge_sdk.cli import main
    from edge_sdk.runtime.sync.transport import TlsConfig

    from edge_sdk.cloud.acl import Inventory, render_acl

    ca = make_certs(tmp_path, clients=("d1", "publisher"))
    acl = tmp_path / "acl"
    acl.write_text(render_acl(Inventory(fleets={"f": {"devices": ["d1"], "publishers": ["publisher"]}})))
    broker = mosquitto_factory(start=False)
    broker.conf_path.write_text(
        f"per_listener_settings false\nallow_anonymous false\nacl_file {acl}\nuser root\n"
        f"listener {broker.port} 127.0.0.1\ncafile {ca}\ncertfile {tmp_path}/server.crt\nkeyfile {tmp_path}/server.key\n"
        f"require_certificate true\nuse_identity_as_username true\nlog_dest file {broker.log_path}\n")
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"

    def device(**tls) -> Transport:
        return Transport(TransportConfig.from_url(url, client_id="d1", tls=TlsConfig(ca=ca, **tls),
                                                  reconnect_min_s=0.05, reconnect_max_s=0.3))

    desired = Inbox()
    dev = device(cert=tmp_path / "d1.crt", key=tmp_path / "d1.key")
    dev.subscribe(T.desired("d1"), desired)
    with dev:
        assert dev.wait_connected(10), dev.last_error
        assert dev.publish(T.reported("d1"), b"{}", qos=1, wait=5)  # user d1 by certificate: its ACLs apply
        with pytest.raises(SyncError, match="(?i)not authori"):
            dev.publish(T.desired("d1"), b"{}", qos=1, wait=5)
        time.sleep(0.2)
        with pytest.raises(SystemExit) as done:
            main(["cloud", "desire", "--broker", url, "--fleet", "f", "--device", "d1", "--model", "cnn",
                  "--version", "2", "--ca", str(ca), "--cert", str(tmp_path / "publisher.crt"),
                  "--key", str(tmp_path / "publisher.key")])
        assert done.value.code == 0
        assert b'"version": 2' in desired.wait_for(1)[0].payload
    no_cert = device()
    no_cert.start()
    assert not no_cert.wait_connected(1.5) and no_cert.last_error
    no_cert.stop()
    with pytest.raises(SystemExit) as refused:  # --key alone is a usage error, caught before connecting
        main(["cloud", "desire", "--broker", url, "--fleet", "f", "--model", "cnn", "--ca", str(ca),
              "--key", str(tmp_path / "publisher.key")])
    assert refused.value.code == 1


def test_reconnect_backoff_grows_with_full_jitter_up_to_the_cap(monkeypatch):
    """Each delay is drawn from [min, min·2^attempt] capped at max; a successful connect resets it."""
    t = Transport(TransportConfig(host="127.0.0.1", client_id="d1", reconnect_min_s=0.5, reconnect_max_s=8.0))
    delays: list[tuple[float, float]] = []
    monkeypatch.setattr(t._client, "reconnect_delay_set", lambda lo, hi: delays.append((lo, hi)))
    draws: list[tuple[float, float]] = []
    real_uniform = __import__("random").uniform

    def uniform(lo: float, hi: float) -> float:
        draws.append((lo, hi))
        return real_uniform(lo, hi)

    monkeypatch.setattr("edge_sdk.runtime.sync.transport.random.uniform", uniform)
    for _ in range(12):
        t._backoff()
    # the jitter range doubles each attempt from min, and stops at the cap
    assert [hi for _, hi in draws] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert all(lo == 0.5 for lo, _ in draws)
    # paho is told to wait exactly the drawn delay (min = max), always within the bounds
    assert all(lo == hi and 0.5 <= lo <= 8.0 for lo, hi in delays) and len(delays) == 12
    assert len({d for d, _ in delays[4:]}) > 1  # jittered, not lock-step
    # a successful CONNACK resets the schedule
    class Ok:
        is_failure = False

    monkeypatch.setattr(t._client, "subscribe", lambda *a, **k: None)
    t._on_connect(t._client, None, type("F", (), {"session_present": False})(), Ok(), None)
    draws.clear()
    t._backoff()
    assert draws == [(0.5, 0.5)]
    # huge attempt counts do not overflow
    t._attempt = 10_000
    t._backoff()
    assert draws[-1] == (0.5, 8.0)
