"""``mqtt``: chunks as retained messages ``<prefix>/blobs/<sha256>`` on the fleet's own broker.

The embedded default for small fleets: nothing to run besides the broker. Every byte of every
release lives in the broker's memory, so at fleet size use ``s3`` or ``http`` and keep MQTT for
control messages. Each message is capped at ``max_message_bytes`` on both sides: the publisher
refuses a larger chunk (managed brokers cap payloads, 128 KB on AWS IoT Core), and a device
refuses a larger payload without storing it (``oversized_message``).

Retained messages arrive on subscribe, so a device subscribes to each chunk it needs and
subscribes again when one stalls (the broker restarted, or the chunk was republished).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping

from edge_sdk.errors import ConfigError
from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

from ..transport import Message
from .base import Store, StoredChunk, StoreError, StoreOptions

#: Wait for the broker's acknowledgement after this many chunks / bytes (bounds memory in flight).
ACK_EVERY_CHUNKS = 32
ACK_EVERY_BYTES = 4 << 20


class MqttStore(Store):
    scheme = "mqtt"

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(url, options)
        if options.transport is None or options.topics is None:
            raise ConfigError("the mqtt chunk store needs the fleet's MQTT transport and topics")
        self.transport, self.topics = options.transport, options.topics
        self._lock = threading.Lock()
        self._unacked_chunks = self._unacked_bytes = 0
        self._verified: set[str] | None = None  # retained blobs whose payload hashes to their topic

    # -- device side ---------------------------------------------------------------------------
    def fetch(self, ref: ChunkRef, deadline: float) -> bytes:
        topic = self.topics.blob(ref.sha256)
        box: queue.Queue[Message] = queue.Queue()
        self.transport.subscribe(topic, box.put, qos=1)
        self.counters["requests_subscribe"] += 1
        asked = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise StoreError(f"chunk {ref.sha256[:12]}… did not arrive from the broker in time "
                                     f"(not published, or the broker is unreachable)", ErrorKind.STORE_UNREACHABLE)
                if now - asked > self.options.stall_s and self.transport.connected:
                    self.transport.unsubscribe(topic)
                    self.transport.subscribe(topic, box.put, qos=1)
                    self.counters["retries"] += 1
                    asked = now
                try:
                    message = box.get(timeout=min(0.25, max(deadline - now, 0.01)))
                except queue.Empty:
                    continue
                if not message.payload:
                    continue  # cleared on the broker (gc); the stall timer asks again
                if len(message.payload) > self.options.max_message_bytes:
                    self.counters["oversized_messages"] += 1
                    raise StoreError(f"chunk {ref.sha256[:12]}…: {len(message.payload)}-byte message at {topic} is "
                                     f"over the {self.options.max_message_bytes}-byte cap; refused",
                                     ErrorKind.OVERSIZED_MESSAGE)
                self.counters["chunks_fetched"] += 1
                self.counters["bytes_received"] += len(message.payload)
                return message.payload
        finally:
            self.transport.unsubscribe(topic)

    # -- cloud side ----------------------------------------------------------------------------
    def present(self, shas: Collection[str]) -> set[str]:
        wanted = set(shas)
        return {chunk.sha256 for chunk in self.listing() if chunk.sha256 in wanted}

    def intact(self, chunks: Mapping[str, bytes]) -> set[str]:
        """From the listing, which hashes every retained payload as it passes (it has to receive
        them all anyway: MQTT cannot list without delivering)."""
        if self._verified is None:
            for _ in self.listing():
                pass
        return {sha for sha in chunks if sha in self._verified}

    def listing(self) -> Iterator[StoredChunk]:
        from edge_sdk.cloud.connection import retained_digests  # cloud side only

        verified: set[str] = set()
        for topic, (size, digest) in retained_digests(self.transport, self.topics, self.topics.all_blobs()).items():
            match = self.topics.parse(topic)
            if match is not None and match.sha256 is not None:
                if digest == match.sha256:
                    verified.add(digest)
                yield StoredChunk(match.sha256, size, 0.0)  # MQTT keeps no time
        self._verified = verified

    def delete(self, sha256: str) -> None:
        """Clear the retained chunk (an empty retained message); :meth:`flush` waits for the broker."""
        self._send(self.topics.blob(sha256), b"")

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.options.max_message_bytes:
            raise StoreError(f"chunk {sha256[:12]}… is {len(data)} bytes, over the broker's "
                             f"{self.options.max_message_bytes}-byte message cap: publish to an s3:// or http(s):// "
                             "store, or raise the cap", ErrorKind.OVERSIZED_MESSAGE)
        self._send(self.topics.blob(sha256), data)
        self.counters["chunks_put"] += 1
        self.counters["bytes_sent"] += len(data)

    def _send(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._unacked_chunks += 1
            self._unacked_bytes += len(payload)
            wait = self._unacked_chunks >= ACK_EVERY_CHUNKS or self._unacked_bytes >= ACK_EVERY_BYTES
            if wait:
                self._unacked_chunks = self._unacked_bytes = 0
        # PUBACKs come in order, so waiting for one acknowledges every message sent before it.
        if not self.transport.publish(topic, payload, qos=1, retain=True, wait=60.0 if wait else None):
            raise StoreError(f"broker did not take {topic} within 60s", ErrorKind.STORE_UNREACHABLE)

    def flush(self) -> None:
        with self._lock:
            if not self._unacked_chunks:
                return
            self._unacked_chunks = self._unacked_bytes = 0
        # An acknowledged QoS 1 message after the chunks acknowledges them all (PUBACKs are in order).
        probe = f"{self.topics.prefix}/_probe/{uuid.uuid4().hex}"
        if not self.transport.publish(probe, b"", qos=1, wait=60.0):
            raise StoreError("broker did not acknowledge the published chunks within 60s", ErrorKind.STORE_UNREACHABLE)
