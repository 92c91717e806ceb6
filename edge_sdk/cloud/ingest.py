"""Cloud ingest: shared-subscription telemetry workers that commit, de-duplicate and ack.

Each worker subscribes to ``$share/<group>/<prefix>/+/telemetry`` so any number of workers (on
one Mosquitto, or any MQTT 5 broker cluster) split the load. For each batch a worker:

1. checks it (wire format: :mod:`edge_sdk.runtime.sync.telemetry`; decoded in C when msgspec is
   installed, see :func:`_prepare_fast`). A malformed one is logged
   with the device and the reason, counted, and skipped — it never stops the worker and never
   touches good records. A batch over ``max_batch_bytes`` is not parsed at all and a record over
   ``max_record_bytes`` is not stored: they are **rejected** — counted, kept in ``rejected`` by
   (device, boot, seq) without their data, and settled, so the ack covers them and the device
   stops resending them;
2. commits it to its sink (:mod:`edge_sdk.cloud.sinks`: SQLite or PostgreSQL) in one transaction
   with every other batch that arrived meanwhile, dropping duplicates by ``(device, boot, seq)``;
   when the database is down it retries the same batches with backoff and acks nothing;
3. only then publishes ``{"v": 1, "boot": …, "upto": N}`` to ``<prefix>/<device>/telemetry/ack``,
   N being the highest sequence up to which every record of that boot is settled.

Usage::

    sink = open_sink("postgresql://ingest@db/telemetry")      # or a SQLite path
    worker = IngestWorker(transport, Topics("plant1"), sink, group="ingest")
    worker.start() … worker.stop()
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.outbox import MAX_RECORD_BYTES
from edge_sdk.runtime.sync.telemetry import (
    BOOT_ID, MAX_BATCH_BYTES, MAX_RECORDS_PER_BATCH, WIRE_VERSION, WireBatch, decode_batch, encode_ack,
)
from edge_sdk.runtime.sync.topics import TopicKind, Topics, check_level
from edge_sdk.runtime.sync.transport import Message, TlsConfig, Transport, TransportConfig

from .sinks import Incoming, Rejection, Sink, SinkUnavailable, StoredRecord, open_sink
from .sinks.sqlite import SqliteSink

log = logging.getLogger(__name__)

__all__ = ["IngestLimits", "IngestWorker", "SqliteSink", "open_sink", "prepare", "run_ingest"]


@dataclass(frozen=True)
class IngestLimits:
    """Sizes past which ingest refuses telemetry instead of holding it in memory and storage."""

    max_record_bytes: int = MAX_RECORD_BYTES  # one record's data as JSON text (devices refuse larger ones)
    max_batch_bytes: int = MAX_BATCH_BYTES  # one MQTT payload (the uploader sends ≤ 256 KiB + one record)

    def __post_init__(self) -> None:
        if self.max_record_bytes < 1 or not 1024 <= self.max_batch_bytes <= MAX_BATCH_BYTES:
            raise ConfigError(f"ingest limits: max_record_bytes must be ≥ 1 and max_batch_bytes 1024-{MAX_BATCH_BYTES}")


# -- checking one payload ---------------------------------------------------------------------------
# One encoder for every record (json.dumps with options builds a new one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def prepare(device: str, payload: bytes, limits: IngestLimits) -> Incoming:
    """Check one telemetry payload of ``device`` into what a sink commits (raises :class:`SyncError`
    when it is malformed); records over the limits become rejections."""
    if len(payload) > limits.max_batch_bytes:
        boot, floor, seqs = scan_oversized(payload)
        reason = f"batch of {len(payload)} bytes is over the {limits.max_batch_bytes}-byte limit"
        return Incoming(device, boot, floor, rejected=tuple(Rejection(s, len(payload), reason) for s in seqs))
    fast = _prepare_fast(device, payload, limits) if _FAST is not None else None
    return fast if fast is not None else _prepare_stdlib(device, payload, limits)


def _prepare_stdlib(device: str, payload: bytes, limits: IngestLimits) -> Incoming:
    """The reference path: every record decoded to Python objects and encoded again (names any defect)."""
    batch: WireBatch = decode_batch(payload)
    records, rejected = [], []
    for r in batch.records:
        try:
            text = _ENCODE(r.data)
        except (TypeError, ValueError):
            rejected.append(Rejection(r.seq, 0, "data is not storable JSON (NaN or Infinity)"))
            continue
        size = len(text.encode())
        if size > limits.max_record_bytes:
            rejected.append(Rejection(r.seq, size, f"record of {size} bytes is over the {limits.max_record_bytes}-byte limit"))
        elif "\\u0000" in text:  # PostgreSQL's jsonb cannot hold NUL; refuse it on every sink alike
            rejected.append(Rejection(r.seq, size, "data holds a NUL character"))
        else:
            records.append(StoredRecord(r.seq, r.ts, r.priority, r.kind, text))
    return Incoming(device, batch.boot, batch.floor, tuple(records), tuple(rejected))


# msgspec (the ``cloud`` extra) decodes a whole batch in C and hands each record's data back as the
# JSON text the device sent (``msgspec.Raw``: checked, never turned into Python objects), so no
# record is decoded and encoded again — the bulk of ingest's CPU otherwise. The fast path takes only
# batches it can vouch for; anything else (NaN, a wrong type, a missing key, seqs out of order …)
# goes the stdlib way, which names the defect or rejects just the one record. Without msgspec
# every batch goes the stdlib way: slower, same rows.
def _fast_decoder():
    try:
        import msgspec
    except ImportError:
        return None
    from typing import Annotated

    record = tuple[int, float, Annotated[int, msgspec.Meta(ge=0)],
                   Annotated[str, msgspec.Meta(min_length=1, max_length=128)], msgspec.Raw]
    batch = msgspec.defstruct("FastBatch", [("v", int), ("boot", str), ("floor", int), ("records", list[record])])
    return msgspec.json.Decoder(batch).decode, msgspec.DecodeError


_FAST = _fast_decoder()


def _prepare_fast(device: str, payload: bytes, limits: IngestLimits) -> Incoming | None:
    """:func:`prepare` of a well-formed batch without per-record JSON work; None: ask the stdlib path."""
    decode, failed = _FAST
    try:
        batch = decode(payload)
    except failed:
        return None
    if batch.v != WIRE_VERSION or batch.floor < 1 or not BOOT_ID.fullmatch(batch.boot) or \
            not 0 < len(batch.records) <= MAX_RECORDS_PER_BATCH:
        return None
    records, rejected = [], []
    last = batch.floor - 1
    for seq, ts, priority, kind, raw in batch.records:
        if seq <= last or not math.isfinite(ts):
            return None
        last = seq
        data = bytes(raw)
        if len(data) > limits.max_record_bytes:
            rejected.append(Rejection(seq, len(data), f"record of {len(data)} bytes is over the "
                                                      f"{limits.max_record_bytes}-byte limit"))
        elif b"\\u0000" in data:  # PostgreSQL's jsonb cannot hold NUL; refuse it on every sink alike
            rejected.append(Rejection(seq, len(data), "data holds a NUL character"))
        else:
            try:
                records.append(StoredRecord(seq, ts, priority, kind, data.decode()))
            except UnicodeDecodeError:
                return None
    return Incoming(device, batch.boot, batch.floor, tuple(records), tuple(rejected))


_HEAD = re.compile(rb'\s*\{\s*"v"\s*:\s*1\s*,\s*"boot"\s*:\s*"([0-9A-Za-z_-]{1,64})"\s*,\s*"floor"\s*:\s*(\d{1,18})\s*,'
                   rb'\s*"records"\s*:\s*\[')
# A JSON string (unrolled, so a long one is one C-level match) or a bracket; nothing else matters.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SEQ = re.compile(rb"\s*(\d{1,18})\s*,")


def scan_oversized(payload: bytes) -> tuple[str, int, list[int]]:
    """Boot, floor and record sequences of a batch too large to parse, in bounded memory.

    Relies on the uploader's key order (``v``, ``boot``, ``floor``, ``records``); anything else
    is malformed (not acked), since only the device's own records are at stake.
    """
    head = _HEAD.match(payload)
    if head is None:
        raise SyncError(f"oversized batch ({len(payload)} bytes) does not start like a telemetry batch")
    boot, floor = head.group(1).decode(), int(head.group(2))
    seqs: list[int] = []
    depth = 1  # inside "records"
    for token in _TOKEN.finditer(payload, head.end()):
        char = token.group()[:1]
        if char in b"[{":
            depth += 1
            if depth == 2 and char == b"[":
                seq = _SEQ.match(payload, token.end())
                if seq is None or int(seq.group(1)) < max(floor, seqs[-1] + 1 if seqs else 0):
                    raise SyncError(f"oversized batch: record {len(seqs)} has no ascending seq ≥ floor")
                seqs.append(int(seq.group(1)))
                if len(seqs) > MAX_RECORDS_PER_BATCH:
                    raise SyncError(f"oversized batch: more than {MAX_RECORDS_PER_BATCH} records")
        elif char in b"]}":
            depth -= 1
            if depth == 0:
                break
    if depth != 0 or not seqs:
        raise SyncError(f"oversized batch ({len(payload)} bytes): records list is not closed, or empty")
    return boot, floor, seqs


# -- the worker ---------------------------------------------------------------------------------------
class IngestWorker:
    """One shared-subscription consumer. ``transport``: see :mod:`edge_sdk.runtime.sync.transport`.

    The transport's thread checks payloads and queues them (at most ``queue_batches``: when the
    database is slow or down, the broker holds the rest); one committer thread commits whatever is
    queued in one transaction and then acks each batch.
    """

    def __init__(self, transport: Transport, topics: Topics, sink: Sink, group: str = "ingest",
                 limits: IngestLimits | None = None, queue_batches: int = 256, max_commit_records: int = 20_000,
                 retention_s: float | None = None, retry_max_s: float = 5.0) -> None:
        self.transport = transport
        self.topics = topics
        self.sink = sink
        self.limits = limits or IngestLimits()
        self.filter = topics.telemetry_shared(check_level(group, "share group"))
        self.max_commit_records = max_commit_records
        self.retention_s = retention_s
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue[Incoming] = queue.Queue(maxsize=queue_batches)
        self._stop = threading.Event()
        self._committer: threading.Thread | None = None
        #: per-process counters (the sink keeps the durable ones)
        self.batches = 0
        self.records = 0
        self.duplicates = 0
        self.rejected = 0
        self.malformed = 0
        self.errors = 0  # commits that failed and were retried

    def start(self) -> None:
        self._stop.clear()
        self._committer = threading.Thread(target=self._commit_loop, name="ingest-commit", daemon=True)
        self._committer.start()
        self.transport.subscribe(self.filter, self.handle, qos=1)
        self.transport.start()

    def stop(self) -> None:
        """Stop receiving, commit and ack what is queued (one attempt each), then disconnect."""
        try:
            self.transport.unsubscribe(self.filter)
        except SyncError:
            pass
        self._stop.set()  # handle() stops queueing; a commit that keeps failing gives up
        if self._committer is not None:
            self._committer.join(60)
        self.transport.stop()

    def handle(self, message: Message) -> None:
        """Check one batch and queue it (blocks while the queue is full). Never raises."""
        device = self.topics.device_of(message.topic, TopicKind.TELEMETRY)
        try:
            if device is None:
                raise SyncError(f"not a telemetry topic of this fleet: {message.topic!r}")
            incoming = prepare(device, message.payload, self.limits)
        except SyncError as exc:
            self.malformed += 1
            log.error("malformed telemetry from %s: %s", device or message.topic, exc)
            self._count_malformed(device, str(exc))
            return
        if incoming.rejected:
            log.warning("telemetry from %s: %d record(s) rejected: %s", device, len(incoming.rejected),
                        incoming.rejected[0].reason)
        while not self._stop.is_set():
            try:
                self._queue.put(incoming, timeout=0.5)
                return
            except queue.Full:
                continue

    def _count_malformed(self, device: str | None, reason: str) -> None:
        try:
            self.sink.count_malformed(device, reason)
        except SyncError as exc:
            log.error("could not count a malformed batch: %s", exc)

    def _take(self) -> list[Incoming] | None:
        """Everything queued (up to ``max_commit_records``), waiting for the first; None once stopped and empty."""
        while True:
            try:
                first = self._queue.get(timeout=0.2)
                break
            except queue.Empty:
                if self._stop.is_set():
                    return None
        group, records = [first], first.received
        while records < self.max_commit_records:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            group.append(item)
            records += item.received
        return group

    def _commit_loop(self) -> None:
        pruned_at = time.monotonic()
        while True:
            group = self._take()
            if group is None:
                return
            self._commit_with_retry(group)
            if self.retention_s and time.monotonic() - pruned_at > min(60.0, self.retention_s / 10):
                pruned_at = time.monotonic()
                try:
                    self.sink.prune(self.retention_s)
                except SyncError as exc:
                    log.error("retention: %s", exc)

    def _commit_with_retry(self, group: list[Incoming]) -> None:
        delay = 0.2
        while True:
            try:
                result = self.sink.commit(group)
                break
            except SinkUnavailable as exc:  # nothing committed, nothing acked: try again
                self.errors += 1
                log.error("telemetry not stored yet (%d batches held, retrying in %.1fs): %s", len(group), delay, exc)
                if self._stop.wait(delay):
                    return  # stopping: the devices resend what was never acked
                delay = min(self.retry_max_s, delay * 2)
            except SyncError as exc:  # the database refuses some data: find the batch, keep the rest
                if len(group) == 1:
                    self.malformed += 1
                    log.error("telemetry from %s refused by the database: %s", group[0].device, exc)
                    self._count_malformed(group[0].device, str(exc))
                    return
                for item in group:
                    self._commit_with_retry([item])
                return
        self.batches += len(group)
        self.records += result.new
        self.duplicates += result.duplicates
        self.rejected += result.rejected
        for item in group:
            upto = result.upto.get(item.key, 0)
            if upto > 0:
                self.transport.publish(self.topics.telemetry_ack(item.device), encode_ack(item.boot, upto), qos=1)


def run_ingest(
    broker: str,
    fleet: str,
    db: Path | str,
    *,
    group: str = "ingest",
    prefix: str = "",
    client_id: str | None = None,
    tls: TlsConfig | None = None,
    session_expiry_s: int = 0,
    limits: IngestLimits | None = None,
    retention_s: float | None = None,
    stop: threading.Event | None = None,
    report_every_s: float = 0.0,
    report: Callable[[IngestWorker], None] | None = None,
) -> IngestWorker:
    """Run one ingest worker into ``db`` (a SQLite path or a ``postgresql://`` URL) until ``stop``
    is set; returns the worker (its counters).

    ``session_expiry_s`` defaults to 0: a stopped worker should not keep a share of the
    subscription queued for itself (devices resend anything not acked, so nothing is lost).
    ``report(worker)`` is called every ``report_every_s`` seconds when both are given.
    """
    topics = Topics(fleet, prefix=prefix)
    cid = client_id or f"ingest-{group}-{socket.gethostname()}-{os.getpid()}"
    config = TransportConfig.from_url(broker, client_id=cid, tls=tls, session_expiry_s=session_expiry_s)
    sink = open_sink(db, worker=cid)
    worker = IngestWorker(Transport(config), topics, sink, group=group, limits=limits, retention_s=retention_s)
    stop = stop or threading.Event()
    worker.start()
    try:
        while not stop.wait(report_every_s or 1.0):
            if report is not None and report_every_s:
                report(worker)
    finally:
        worker.stop()
        sink.close()
    return worker
