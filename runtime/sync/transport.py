"""A thin MQTT 5 client over paho-mqtt 2.x: the only module of the SDK that talks to paho.

Interface (kept small so upper layers can swap in an in-memory fake with the same methods)::

    cfg = TransportConfig.from_url("mqtt://user:pw@broker:1883", client_id="cam-7",
                                   status_topic=topics.status("cam-7"))
    t = Transport(cfg)
    t.add_state_listener(lambda connected: ...)   # called on every connect / disconnect
    t.subscribe(topics.telemetry_ack("cam-7"), handler, qos=1)   # handler(Message)
    t.start()                                  # never blocks, never raises for a missing broker
    t.wait_connected(5.0) -> bool
    t.publish(topic, payload, qos=1, retain=False)              # -> True once queued
    t.publish(topic, payload, qos=1, wait=5.0)                  # -> True once PUBACKed
    t.stop()

Behaviour:

* MQTT 5 only, ``clean_start=False`` plus a Session Expiry Interval, so the broker keeps QoS 1
  subscriptions and queued messages while we are away (in MQTT 5 ``clean_start=False`` alone
  ends the session at disconnect). Subscriptions are also renewed on every connect, because a
  broker that restarted without persistence has forgotten the session.
* Offline-first: :meth:`start` returns at once; paho's network thread keeps retrying in the
  background with exponential backoff and full jitter between ``reconnect_min_s`` and
  ``reconnect_max_s``. QoS ≥ 1 publishes made while offline are kept in memory by paho and sent
  after reconnecting (durability is the outbox's job, not this module's).
* ``status_topic``: a retained Last Will ``{"online": false}``; ``{"online": true}`` retained on
  every connect, ``{"online": false}`` on a clean :meth:`stop`.
* Handlers run on the network thread; an exception in one is logged and counted
  (``handler_errors``) and never stops the client. A handler must not call
  ``publish(..., wait=…)`` (the ack it waits for is read by that same thread); plain
  ``publish`` from a handler is fine.
* Counters: ``connects`` (successful CONNACKs), ``refused`` (publishes/subscriptions the broker
  refused), ``handler_errors``, ``oversized`` (incoming messages above ``max_message_bytes``,
  dropped before any handler sees them); ``last_error`` describes the latest connection problem.
* A publish refused by the broker (e.g. denied by an ACL: MQTT 5 reports it in the PUBACK,
  3.1.1 would drop it silently) makes ``publish(..., wait=…)`` raise :class:`SyncError`.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, model_validator

from edge_sdk.config import FieldError, StrictModel, describe_validation_error
from edge_sdk.errors import ConfigError, MissingDependencyError, SyncError

log = logging.getLogger(__name__)

ONLINE = json.dumps({"online": True}).encode()
OFFLINE = json.dumps({"online": False}).encode()


class TlsConfig(StrictModel):
    """TLS to the broker (``mqtts://``): the CA that signed the broker's certificate, and
    optionally this device's own certificate and key (client-certificate authentication)."""

    ca: Path
    cert: Path | None = Field(None, description="client certificate (PEM); may also hold the key")
    key: Path | None = Field(None, description="client private key (PEM), when not inside cert")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key is not None and self.cert is None:
            raise FieldError(("cert",), "key is set but cert is not: a client key needs its certificate")
        return self


class TransportConfig(StrictModel):
    """Where and how to connect. Build it directly or with :meth:`from_url`."""

    host: str
    port: int = Field(1883, ge=1, le=65535)
    client_id: str = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = Field(30, ge=5)
    #: How long the broker keeps our session (subscriptions, queued QoS 1 messages) while away.
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    #: QoS 1 messages in flight (sent, not yet PUBACKed) before paho queues further ones.
    max_inflight: int = Field(100, ge=1)
    status_topic: str | None = None
    #: Larger incoming messages are dropped unparsed and counted in ``oversized`` (the shipped
    #: broker refuses packets above 8 MiB; a broker without a cap must not make us parse more).
    max_message_bytes: int = Field(8 << 20, ge=1024)

    @classmethod
    def from_url(cls, url: str, **fields: object) -> TransportConfig:
        """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` (TLS, port 8883; pass ``tls=``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtt://host[:port] or mqtts://host[:port]")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from None
        if parts.scheme == "mqtts" and fields.get("tls") is None:
            raise ConfigError(f"broker URL {url!r} uses mqtts:// but no TLS settings (CA file) were given")
        values: dict[str, object] = {"host": parts.hostname, "port": port}
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = unquote(parts.password)
        values.update(fields)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(f"broker settings for {url!r}", exc)) from None


@dataclass(frozen=True)
class Message:
    """A received message, independent of paho's types."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


Handler = Callable[[Message], None]
StateListener = Callable[[bool], None]


def _paho():
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
    except ImportError:  # pragma: no cover - paho is a core dependency
        raise MissingDependencyError("paho-mqtt", "daemon", "MQTT sync") from None
    return mqtt, PacketTypes, Properties


class Transport:
    """One MQTT 5 connection with background reconnects. See the module docstring."""

    def __init__(self, config: TransportConfig) -> None:
        mqtt, PacketTypes, Properties = _paho()
        self.config = config
        self._mqtt = mqtt
        self._PacketTypes, self._Properties = PacketTypes, Properties
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._listeners: list[StateListener] = []
        self._pending: dict[int, threading.Event] = {}  # mid -> set on PUBACK/PUBCOMP
        self._failures: dict[int, str] = {}  # mid -> refusal reason (bounded)
        self._connected = threading.Event()
        self._attempt = 0
        self._started = False
        #: handler / listener exceptions caught on the network thread
        self.handler_errors = 0
        #: successful connects (CONNACK success), publishes and subscriptions the broker refused
        self.connects = 0
        self.refused = 0
        self.oversized = 0
        #: the latest connection problem in words (None until one happens), for status reports
        self.last_error: str | None = None
        self._connack_failed = False

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            for path in (config.tls.ca, config.tls.cert, config.tls.key):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"TLS file {path} does not exist")
            try:
                client.tls_set(
                    ca_certs=str(config.tls.ca),
                    certfile=str(config.tls.cert) if config.tls.cert else None,
                    keyfile=str(config.tls.key) if config.tls.key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"TLS settings rejected: {exc}") from None
        if config.status_topic:
            client.will_set(config.status_topic, OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(0)  # unbounded; callers bound what they hand us
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._connect_props = Properties(PacketTypes.CONNECT)
        self._connect_props.SessionExpiryInterval = config.session_expiry_s
        self._client = client

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Begin connecting in the background; returns at once even with no broker reachable."""
        if self._started:
            return
        self._started = True
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False,
            properties=self._connect_props,
        )
        self._client.loop_start()

    def stop(self, timeout: float = 2.0) -> None:
        """Mark the device offline (if it has a status topic), disconnect, stop the thread."""
        if not self._started:
            return
        self._started = False
        if self._connected.is_set() and self.config.status_topic:
            try:
                self.publish(self.config.status_topic, OFFLINE, qos=1, retain=True, wait=timeout)
            except SyncError:
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> Transport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until connected (CONNACK success) or ``timeout``; returns whether connected."""
        return self._connected.wait(timeout)

    def add_state_listener(self, listener: StateListener) -> None:
        """``listener(True)`` after each successful connect, ``listener(False)`` on each loss."""
        with self._lock:
            self._listeners.append(listener)

    # -- messaging -----------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` (``$share/…`` allowed) to ``handler``.

        Kept across reconnects; may be called before :meth:`start`.
        """
        if qos not in (0, 1, 2):
            raise ConfigError(f"QoS must be 0, 1 or 2, got {qos!r}")
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
            send_now = self._connected.is_set()  # else _on_connect's snapshot includes it
        if send_now:
            self._send_subscribe(topic_filter, qos)

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        props = self._Properties(self._PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = _sub_id(topic_filter)
        try:
            self._client.subscribe(topic_filter, qos=qos, properties=props)
        except ValueError as exc:  # an invalid filter
            raise SyncError(f"cannot subscribe to {topic_filter!r}: {exc}") from None

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, wait: float | None = None
    ) -> bool:
        """Publish; without ``wait`` returns True once handed to paho (QoS ≥ 1 is kept while offline).

        With ``wait`` (seconds) returns True once the broker acknowledged it (PUBACK / PUBCOMP;
        for QoS 0 once written), False if that did not happen in time. Raises
        :class:`SyncError` if the broker refused the message (reason code ≥ 0x80).
        """
        if qos not in (0, 1, 2):
            raise ConfigError(f"QoS must be 0, 1 or 2, got {qos!r}")
        if isinstance(payload, str):
            payload = payload.encode()
        info = self._publish(topic, payload, qos, retain)
        queued = info.rc in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN)
        if wait is None or not queued or (qos == 0 and info.rc != self._mqtt.MQTT_ERR_SUCCESS):
            return queued
        # Never hold our lock while calling into paho: paho runs on_publish while holding its
        # own message lock, so lock-then-publish here would deadlock against the network thread.
        event = threading.Event()
        with self._lock:
            self._pending[info.mid] = event
        if info.is_published():  # the ack may have arrived before we registered
            event.set()
        done = event.wait(wait)
        with self._lock:
            self._pending.pop(info.mid, None)
            failure = self._failures.pop(info.mid, None) if done else None
        if failure is not None:
            raise SyncError(f"broker refused publish to {topic!r}: {failure}")
        return done

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool):
        try:
            return self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic (wildcards, empty) or payload too large
            raise SyncError(f"cannot publish to {topic!r}: {exc}") from None

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%s refused connection: %s", self.config.host, self.config.port, reason_code)
            self.last_error = f"broker {self.config.host}:{self.config.port} refused the connection: {reason_code}"
            self._connack_failed = True  # the disconnect that follows must not overwrite this reason
            self._backoff()
            return
        self._attempt = 0
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        self.connects += 1
        with self._lock:
            # Snapshot and flag together: a subscribe() racing with this either is in the
            # snapshot or sees the flag and sends itself; never neither.
            subs = list(self._subs.items())
            listeners = list(self._listeners)
            self._connected.set()
        for topic_filter, (qos, _) in subs:
            try:
                self._send_subscribe(topic_filter, qos)
            except SyncError:
                log.exception("re-subscribing failed")
        if self.config.status_topic:
            client.publish(self.config.status_topic, ONLINE, qos=1, retain=True)
        log.info("connected to %s:%s (session present: %s)", self.config.host, self.config.port, flags.session_present)
        self._notify(listeners, True)

    def _on_connect_fail(self, client, userdata) -> None:
        self.last_error = (
            f"cannot connect to {self.config.host}:{self.config.port} (unreachable, or the TLS handshake failed)"
        )
        self._backoff()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._started:
            self._backoff()
        if not was and not self._connack_failed:
            self.last_error = (
                f"{self.config.host}:{self.config.port} closed the connection before accepting it "
                f"({reason_code}; TLS expected, or a protocol mismatch?)"
            )
        self._connack_failed = False
        if was:
            log.info("disconnected from %s:%s: %s", self.config.host, self.config.port, reason_code)
            self.last_error = f"connection to {self.config.host}:{self.config.port} lost: {reason_code}"
            with self._lock:
                listeners = list(self._listeners)
            self._notify(listeners, False)

    def _backoff(self) -> None:
        # Exponential backoff with full jitter, so a fleet that lost its broker does not
        # reconnect in lock-step. paho waits ``min_delay`` next time after this reset.
        cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** min(self._attempt, 30))
        self._attempt += 1
        delay = random.uniform(self.config.reconnect_min_s, max(cap, self.config.reconnect_min_s))
        self._client.reconnect_delay_set(delay, delay)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if reason_code.is_failure:
                log.warning("broker refused message %s: %s", mid, reason_code)
                self.refused += 1
                self._failures[mid] = str(reason_code)
                while len(self._failures) > 1024:  # only the waiters need them; keep it bounded
                    self._failures.pop(next(iter(self._failures)))
            else:
                self._failures.pop(mid, None)  # a reused mid must not inherit an old refusal
            event = self._pending.get(mid)
        if event is not None:
            event.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                self.refused += 1
                log.warning("broker refused a subscription (mid %s): %s", mid, code)

    def _on_message(self, client, userdata, msg) -> None:
        if len(msg.payload) > self.config.max_message_bytes:
            self.oversized += 1
            log.warning("dropped a %d-byte message on %s (limit %d bytes)", len(msg.payload), msg.topic,
                        self.config.max_message_bytes)
            return
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        # Overlapping filters make the broker deliver one copy per matching subscription, each
        # tagged with its subscription identifier: route each copy only to its own handler.
        # Untagged copies (e.g. queued under a session from an older process) go by filter match.
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        with self._lock:
            handlers = [h for f, (_, h) in self._subs.items() if _sub_id(f) in ids]
            if not handlers:
                handlers = [h for f, (_, h) in self._subs.items() if _matches(f, msg.topic)]
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a bad handler must never take the network thread down
                self.handler_errors += 1
                log.exception("handler for %s failed", msg.topic)

    def _notify(self, listeners: list[StateListener], connected: bool) -> None:
        for listener in listeners:
            try:
                listener(connected)
            except Exception:
                self.handler_errors += 1
                log.exception("connection-state listener failed")


def _sub_id(topic_filter: str) -> int:
    """A stable MQTT 5 subscription identifier (1 … 268435455) for a filter, equal across processes."""
    return zlib.crc32(topic_filter.encode()) % 268_435_455 + 1


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter match; ``$share/<group>/`` is stripped first (the broker already routed it)."""
    from paho.mqtt.client import topic_matches_sub

    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    try:
        return topic_matches_sub(topic_filter, topic)
    except ValueError:
        return False
