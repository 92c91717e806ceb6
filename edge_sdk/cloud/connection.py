"""Short-lived broker connections for cloud-side commands, and reading retained state.

MQTT has no "list topics": the only way to see what is retained under a filter is to subscribe
and receive it. :func:`collect_retained` knows it has everything by a probe: after subscribing
to the filter it subscribes to a private probe topic and publishes one message there. A broker
delivers a subscription's retained messages before it processes the client's next packets, so
once the probe comes back every retained message of the filter has arrived.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from edge_sdk.chunking import sha256_bytes
from edge_sdk.errors import SyncError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import Message, TlsConfig, Transport, TransportConfig

T = TypeVar("T")


@contextmanager
def connect(broker: str, purpose: str, tls: TlsConfig | None = None, timeout: float = 10.0) -> Iterator[Transport]:
    """A connected :class:`Transport` for one command; no session is left on the broker."""
    config = TransportConfig.from_url(broker, client_id=f"edge-sdk-{purpose}-{uuid.uuid4().hex[:10]}",
                                      tls=tls, session_expiry_s=0, reconnect_max_s=5.0)
    transport = Transport(config)
    transport.start()
    try:
        if not transport.wait_connected(timeout):
            raise SyncError(f"cannot reach the broker at {broker} within {timeout:.0f}s")
        yield transport
    finally:
        transport.stop()


def collect_retained(transport: Transport, topics: Topics, topic_filter: str, timeout: float = 30.0) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` (empty payloads, i.e. deleted ones, skipped)."""
    return _retained(transport, topics, topic_filter, timeout, lambda payload: payload)


def retained_digests(transport: Transport, topics: Topics, topic_filter: str,
                     timeout: float = 120.0) -> dict[str, tuple[int, str]]:
    """Topic → (payload size, payload sha256) of every retained message under ``topic_filter``,
    keeping no payload (for the blob store, whose payloads would not fit in memory all at once)."""
    return _retained(transport, topics, topic_filter, timeout, lambda payload: (len(payload), sha256_bytes(payload)))


def _retained(transport: Transport, topics: Topics, topic_filter: str, timeout: float,
              keep: Callable[[bytes], T]) -> dict[str, T]:
    found: dict[str, T] = {}
    done = threading.Event()
    probe = f"{topics.prefix}/_probe/{uuid.uuid4().hex}"

    def on_message(message: Message) -> None:
        if message.retain and message.payload:
            found[message.topic] = keep(message.payload)

    transport.subscribe(topic_filter, on_message, qos=1)
    transport.subscribe(probe, lambda m: done.set(), qos=1)
    try:
        if not transport.publish(probe, b"1", qos=1, wait=timeout) or not done.wait(timeout):
            raise SyncError(f"broker did not answer while listing {topic_filter} within {timeout:.0f}s")
    finally:
        transport.unsubscribe(topic_filter)
        transport.unsubscribe(probe)
    return found
