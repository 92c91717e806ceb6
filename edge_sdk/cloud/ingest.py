"""Cloud ingest: shared-subscription telemetry workers that commit, de-duplicate and ack.

Each worker subscribes to ``$share/<group>/<prefix>/+/telemetry`` so any number of workers (on
one Mosquitto, or any MQTT 5 broker cluster) split the load. For each batch a worker:

1. parses and checks it (see :mod:`edge_sdk.runtime.sync.telemetry` for the wire format); a
   malformed one is logged with the device and the reason, counted, and skipped — it never stops
   the worker and never touches good records;
2. commits the records to its sink in one transaction, dropping duplicates by
   ``(device, boot, seq)`` (counted);
3. only then publishes ``{"boot": …, "upto": N}`` to ``<prefix>/<device>/telemetry/ack``, N being
   the highest sequence up to which every record of that boot is committed.

Sinks are pluggable (:class:`Sink`); :class:`SqliteSink` is the built-in one. Several worker
processes may share one SQLite file (WAL, ``BEGIN IMMEDIATE`` serialises their commits).

Usage::

    sink = SqliteSink("ingest.db")
    worker = IngestWorker(transport, Topics("plant1"), sink, group="ingest")
    worker.start() … worker.stop()
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_sdk.errors import SyncError
from edge_sdk.runtime.sync.telemetry import WireBatch, decode_batch, encode_ack
from edge_sdk.runtime.sync.topics import TopicKind, Topics, check_level
from edge_sdk.runtime.sync.transport import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitResult:
    new: int
    duplicates: int
    #: every record of the batch's boot with floor ≤ seq ≤ upto is committed (0: none yet)
    upto: int


class Sink(Protocol):
    """Where ingest puts records. ``commit`` must be durable and atomic before it returns."""

    def commit(self, device: str, batch: WireBatch) -> CommitResult: ...

    def count_malformed(self, device: str | None, reason: str) -> None: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
    ts REAL NOT NULL, priority INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (device, boot, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL, boot TEXT NOT NULL, upto INTEGER NOT NULL, PRIMARY KEY (device, boot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('batches', 0), ('received', 0), ('records', 0), ('duplicates', 0), ('malformed', 0);
CREATE TABLE IF NOT EXISTS malformed (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, reason TEXT NOT NULL, received REAL NOT NULL
);
"""


class SqliteSink:
    """Records in a SQLite file: ``records``, per-boot ``watermarks``, ``counters``, ``malformed``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an ack promises the records are on disk
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SyncError(f"cannot open ingest database {self.path}: {exc}") from None

    def commit(self, device: str, batch: WireBatch) -> CommitResult:
        now = time.time()
        rows = [
            (device, batch.boot, r.seq, r.ts, r.priority, r.kind, json.dumps(r.data, separators=(",", ":")), now)
            for r in batch.records
        ]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    before = self._db.total_changes
                    self._db.executemany(
                        "INSERT OR IGNORE INTO records (device, boot, seq, ts, priority, kind, data, received) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    new = self._db.total_changes - before
                    upto = self._advance(device, batch.boot, batch.floor)
                    self._db.executemany(
                        "UPDATE counters SET value = value + ? WHERE name = ?",
                        [(1, "batches"), (len(rows), "received"), (new, "records"), (len(rows) - new, "duplicates")],
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise SyncError(f"ingest database {self.path}: commit failed: {exc}") from None
        return CommitResult(new, len(rows) - new, upto)

    def _advance(self, device: str, boot: str, floor: int) -> int:
        """Move the (device, boot) watermark over every contiguous committed seq."""
        row = self._db.execute("SELECT upto FROM watermarks WHERE device = ? AND boot = ?", (device, boot)).fetchone()
        # Below the floor the device holds nothing any more (acked or dropped by its quota).
        upto = max(row[0] if row else 0, floor - 1)
        while True:
            seqs = [
                s
                for (s,) in self._db.execute(
                    "SELECT seq FROM records WHERE device = ? AND boot = ? AND seq > ? ORDER BY seq LIMIT 1000",
                    (device, boot, upto),
                )
            ]
            for s in seqs:
                if s != upto + 1:
                    break
                upto = s
            else:
                if len(seqs) == 1000:
                    continue
            break
        self._db.execute(
            "INSERT INTO watermarks (device, boot, upto) VALUES (?, ?, ?) "
            "ON CONFLICT (device, boot) DO UPDATE SET upto = excluded.upto",
            (device, boot, upto),
        )
        return upto

    def count_malformed(self, device: str | None, reason: str) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'malformed'")
                self._db.execute(
                    "INSERT INTO malformed (device, reason, received) VALUES (?, ?, ?)", (device, reason[:500], time.time())
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                log.error("ingest database %s: cannot count a malformed batch: %s", self.path, exc)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()


class IngestWorker:
    """One shared-subscription consumer. ``transport``: see :mod:`edge_sdk.runtime.sync.transport`."""

    def __init__(self, transport, topics: Topics, sink: Sink, group: str = "ingest") -> None:
        self.transport = transport
        self.topics = topics
        self.sink = sink
        self.filter = topics.telemetry_shared(check_level(group, "share group"))
        #: per-process counters (the sink keeps the durable ones)
        self.batches = 0
        self.records = 0
        self.duplicates = 0
        self.malformed = 0
        self.errors = 0

    def start(self) -> None:
        self.transport.subscribe(self.filter, self.handle, qos=1)
        self.transport.start()

    def stop(self) -> None:
        self.transport.stop()

    def handle(self, message: Message) -> None:
        """Commit one batch and ack it. Never raises: every failure is logged and counted."""
        device = self.topics.device_of(message.topic, TopicKind.TELEMETRY)
        try:
            if device is None:
                raise SyncError(f"not a telemetry topic of this fleet: {message.topic!r}")
            batch = decode_batch(message.payload)
        except SyncError as exc:
            self.malformed += 1
            log.error("malformed telemetry from %s: %s", device or message.topic, exc)
            self.sink.count_malformed(device, str(exc))
            return
        try:
            result = self.sink.commit(device, batch)
        except SyncError as exc:  # no ack: the device sends it again later
            self.errors += 1
            log.error("telemetry from %s not stored (will be resent): %s", device, exc)
            return
        self.batches += 1
        self.records += result.new
        self.duplicates += result.duplicates
        if result.upto > 0:
            self.transport.publish(self.topics.telemetry_ack(device), encode_ack(batch.boot, result.upto), qos=1)


def run_ingest(
    broker: str,
    fleet: str,
    db: Path | str,
    *,
    group: str = "ingest",
    prefix: str = "",
    client_id: str | None = None,
    tls=None,
    session_expiry_s: int = 0,
    stop: threading.Event | None = None,
    report_every_s: float = 0.0,
    report=None,
) -> IngestWorker:
    """Run one ingest worker until ``stop`` is set; returns the worker (its counters).

    ``session_expiry_s`` defaults to 0: a stopped worker should not keep a share of the
    subscription queued for itself (devices resend anything not acked, so nothing is lost).
    ``report(worker)`` is called every ``report_every_s`` seconds when both are given.
    """
    import os
    import socket

    from edge_sdk.runtime.sync.transport import Transport, TransportConfig

    topics = Topics(fleet, prefix=prefix)
    cid = client_id or f"ingest-{group}-{socket.gethostname()}-{os.getpid()}"
    config = TransportConfig.from_url(broker, client_id=cid, tls=tls, session_expiry_s=session_expiry_s)
    sink = SqliteSink(db)
    worker = IngestWorker(Transport(config), topics, sink, group=group)
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
