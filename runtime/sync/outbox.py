"""Durable telemetry outbox: a SQLite file that keeps every accepted record until ingest acks it.

Usage::

    box = Outbox(OutboxConfig(path="/var/lib/edge-sdk/outbox.db", max_bytes=64 << 20))
    seq = box.append({"temp": 41.5}, kind="sensor", priority=Priority.NORMAL)   # durable on return
    batch = box.next_batch(after_id=0, max_records=500, max_bytes=256_000)       # for the uploader
    box.ack(batch.boot, upto=seq)        # ingest committed every seq <= upto of that boot
    box.stats()                          # rows, bytes, appended, dropped, rejected, acked

Guarantees:

* ``append`` returns only after the record is committed with ``journal_mode=WAL`` and
  ``synchronous=FULL``: a ``kill -9`` (or power loss on a disk that honours fsync) right after
  the call cannot lose it.
* Each ``Outbox`` instance is one *boot*: a fresh random ``boot_id`` and a sequence starting at 1,
  so ``(boot_id, seq)`` names a record uniquely forever and ingest can drop duplicates. Records
  of earlier boots stay until acked; several processes may share one file (each is its own boot).
* Quota (``max_rows``/``max_bytes``) with an explicit policy: ``reject`` raises
  :class:`OutboxFullError`; ``drop_oldest`` deletes the oldest records whose priority is not
  higher than the new one's (lowest priority first) and counts them in ``dropped`` — never
  silently. If nothing may be dropped, it raises :class:`OutboxFullError` as well.
* Records leave only through :meth:`ack` (or the drop policy). Freed pages are given back to the
  file system (``auto_vacuum=INCREMENTAL`` plus ``journal_size_limit``).
* Upload order is FIFO (``id``); priority decides what survives a full outbox, not what is sent
  first, so the ingest's "highest contiguous sequence" ack keeps moving.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydantic import Field

from edge_sdk.config import StrictModel
from edge_sdk.errors import OutboxFullError, SyncError
from edge_sdk.types import OutboxPolicy

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    boot TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    size INTEGER NOT NULL,
    UNIQUE (boot, seq)
);
CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, id);
CREATE TABLE IF NOT EXISTS boots (boot TEXT PRIMARY KEY, started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('rows', 0), ('bytes', 0), ('appended', 0), ('dropped', 0), ('rejected', 0), ('acked', 0);
"""
# Fixed per-row overhead added to the payload size when checking the byte quota, so a flood of
# tiny records cannot exceed the file budget by far.
ROW_OVERHEAD = 48


class Priority(IntEnum):
    """Record priority: under ``drop_oldest`` lower priorities are dropped first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


class OutboxConfig(StrictModel):
    """Where the outbox lives and how big it may grow."""

    path: Path
    max_rows: int = Field(1_000_000, ge=1)
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    on_full: OutboxPolicy = OutboxPolicy.REJECT


@dataclass(frozen=True)
class Record:
    """One stored record; ``data`` is its JSON text exactly as stored and sent."""

    id: int
    boot: str
    seq: int
    ts: float
    priority: int
    kind: str
    data: str


@dataclass(frozen=True)
class Batch:
    """Consecutive records of one boot, oldest first. ``floor`` is the smallest seq of that boot
    still in the outbox: everything below it was acked or dropped, so ingest may treat it as settled."""

    boot: str
    floor: int
    records: tuple[Record, ...]

    @property
    def last_id(self) -> int:
        return self.records[-1].id

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq


@dataclass(frozen=True)
class OutboxStats:
    boot_id: str
    rows: int
    bytes: int
    appended: int
    dropped: int
    rejected: int
    acked: int


class Outbox:
    """A durable FIFO of telemetry records. Thread-safe; see the module docstring."""

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        self.boot_id = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is held open.
            self._db = sqlite3.connect(str(config.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective only on a new file
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise SyncError(f"outbox {config.path}: SQLite refused WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA journal_size_limit=4194304")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise SyncError(f"outbox {config.path} has schema version {version}, expected {_SCHEMA_VERSION}")
            # Every statement is idempotent, so concurrent openers of a new file cannot clash.
            self._db.executescript(_SCHEMA + f"PRAGMA user_version={_SCHEMA_VERSION};")
            with self._tx():
                self._db.execute("INSERT INTO boots (boot, started) VALUES (?, ?)", (self.boot_id, time.time()))
        except sqlite3.Error as exc:
            raise SyncError(f"cannot open outbox {config.path}: {exc}") from None

    # -- writing -------------------------------------------------------------------------------
    def append(self, data: Any, kind: str = "record", priority: Priority | int = Priority.NORMAL, ts: float | None = None) -> int:
        """Store one JSON-serialisable record durably; returns its sequence number in this boot.

        Raises :class:`OutboxFullError` when the quota is reached and the policy does not allow
        making room, :class:`SyncError` for an unserialisable record or a storage failure.
        """
        return self.append_many([data], kind=kind, priority=priority, ts=ts)[-1]

    def append_many(
        self, items: list[Any], kind: str = "record", priority: Priority | int = Priority.NORMAL, ts: float | None = None
    ) -> list[int]:
        """Store several records in one durable transaction (one fsync); all or none are stored."""
        priority = int(Priority(priority))
        if not isinstance(kind, str) or not kind:
            raise SyncError(f"record kind must be a non-empty string, got {kind!r}")
        texts = []
        for item in items:
            try:
                texts.append(json.dumps(item, separators=(",", ":"), allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise SyncError(f"record is not JSON-serialisable: {exc}") from None
        sizes = [len(t.encode()) + len(kind) + ROW_OVERHEAD for t in texts]
        need_rows, need_bytes = len(texts), sum(sizes)
        if need_rows > self.config.max_rows or need_bytes > self.config.max_bytes:
            with self._lock:
                self._count_rejected(need_rows)
            raise OutboxFullError(
                f"{need_rows} record(s) of {need_bytes} bytes exceed the outbox quota "
                f"({self.config.max_rows} rows, {self.config.max_bytes} bytes)"
            )
        now = time.time() if ts is None else float(ts)
        with self._lock:
            try:
                with self._tx():
                    rows, size = self._usage()
                    if rows + need_rows > self.config.max_rows or size + need_bytes > self.config.max_bytes:
                        self._make_room(rows, size, need_rows, need_bytes, priority)
                    first = self._seq + 1
                    seqs = list(range(first, first + len(texts)))
                    self._db.executemany(
                        "INSERT INTO records (boot, seq, ts, priority, kind, data, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(self.boot_id, s, now, priority, kind, t, z) for s, t, z in zip(seqs, texts, sizes)],
                    )
                    self._bump(rows=need_rows, bytes=need_bytes, appended=need_rows)
            except OutboxFullError:
                self._count_rejected(need_rows)
                raise
            except sqlite3.Error as exc:
                raise SyncError(f"outbox {self.config.path}: append failed: {exc}") from None
            self._seq = seqs[-1]  # only after the commit: a failed append consumes no sequence
        return seqs

    def _make_room(self, rows: int, size: int, need_rows: int, need_bytes: int, priority: int) -> None:
        if self.config.on_full is OutboxPolicy.REJECT:
            raise OutboxFullError(
                f"outbox {self.config.path} is full ({rows} rows, {size} bytes; quota "
                f"{self.config.max_rows} rows, {self.config.max_bytes} bytes; policy reject)"
            )
        drop_ids: list[int] = []
        freed_rows = freed_bytes = 0
        cursor = self._db.execute(
            "SELECT id, size FROM records WHERE priority <= ? ORDER BY priority, id", (priority,)
        )
        for rid, rsize in cursor:
            if rows - freed_rows + need_rows <= self.config.max_rows and size - freed_bytes + need_bytes <= self.config.max_bytes:
                break
            drop_ids.append(rid)
            freed_rows += 1
            freed_bytes += rsize
        cursor.close()
        if rows - freed_rows + need_rows > self.config.max_rows or size - freed_bytes + need_bytes > self.config.max_bytes:
            raise OutboxFullError(
                f"outbox {self.config.path} is full of records with priority above {priority}; nothing may be dropped"
            )
        self._db.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in drop_ids])
        self._bump(rows=-freed_rows, bytes=-freed_bytes, dropped=freed_rows)

    def ack(self, boot: str, upto: int) -> int:
        """Delete every record of ``boot`` with ``seq <= upto`` (ingest committed them); returns how many."""
        with self._lock:
            try:
                with self._tx():
                    n, freed = self._db.execute(
                        "SELECT COUNT(*), TOTAL(size) FROM records WHERE boot = ? AND seq <= ?", (boot, upto)
                    ).fetchone()
                    if n:
                        self._db.execute("DELETE FROM records WHERE boot = ? AND seq <= ?", (boot, upto))
                        self._bump(rows=-n, bytes=-int(freed), acked=n)
                    if boot != self.boot_id and not self._db.execute(
                        "SELECT 1 FROM records WHERE boot = ? LIMIT 1", (boot,)
                    ).fetchone():
                        self._db.execute("DELETE FROM boots WHERE boot = ?", (boot,))
                if n:
                    # executescript steps the pragma to completion (execute() frees one page per step)
                    self._db.executescript("PRAGMA incremental_vacuum;")  # give freed pages back to the disk
            except sqlite3.Error as exc:
                raise SyncError(f"outbox {self.config.path}: ack failed: {exc}") from None
        return n

    # -- reading -------------------------------------------------------------------------------
    def next_batch(self, after_id: int = 0, max_records: int = 500, max_bytes: int = 256 * 1024) -> Batch | None:
        """The oldest records with ``id > after_id``, all of one boot, within the limits (≥ 1 record)."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, boot, seq, ts, priority, kind, data, size FROM records WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, max_records),
                ).fetchall()
                if not rows:
                    return None
                boot = rows[0][1]
                picked: list[Record] = []
                total = 0
                for rid, rboot, seq, ts, prio, kind, data, size in rows:
                    if rboot != boot or (picked and total + size > max_bytes):
                        break
                    picked.append(Record(rid, rboot, seq, ts, prio, kind, data))
                    total += size
                floor = self._db.execute("SELECT MIN(seq) FROM records WHERE boot = ?", (boot,)).fetchone()[0]
            except sqlite3.Error as exc:
                raise SyncError(f"outbox {self.config.path}: read failed: {exc}") from None
        return Batch(boot, floor, tuple(picked))

    def stats(self) -> OutboxStats:
        with self._lock:
            try:
                c = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            except sqlite3.Error as exc:
                raise SyncError(f"outbox {self.config.path}: read failed: {exc}") from None
        return OutboxStats(self.boot_id, c["rows"], c["bytes"], c["appended"], c["dropped"], c["rejected"], c["acked"])

    def __len__(self) -> int:
        return self.stats().rows

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def _usage(self) -> tuple[int, int]:
        c = dict(self._db.execute("SELECT name, value FROM counters WHERE name IN ('rows', 'bytes')").fetchall())
        return c["rows"], c["bytes"]

    def _bump(self, **deltas: int) -> None:
        self._db.executemany(
            "UPDATE counters SET value = value + ? WHERE name = ?", [(v, k) for k, v in deltas.items() if v]
        )

    def _count_rejected(self, n: int) -> None:
        """Count refused records (caller holds the lock)."""
        try:
            with self._tx():
                self._bump(rejected=n)
        except sqlite3.Error:  # counting must not hide the OutboxFullError being raised
            pass


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on any exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
