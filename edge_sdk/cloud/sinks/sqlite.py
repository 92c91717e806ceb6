"""The embedded sink: one SQLite file (WAL). Several worker processes may share it (``BEGIN
IMMEDIATE`` serialises their commits); for several machines, or more throughput, use PostgreSQL.

Writers of one file also queue on an advisory lock (``flock`` of ``<file>-writer.lock``) around each
transaction: SQLite's own busy handler polls with sleeps up to 100 ms, so two workers contending
for the file spent most of their time asleep (2 workers ingested 3x slower than 1); the kernel
wakes the next writer the moment the lock is released. SQLite's locking still guarantees
correctness; the advisory lock only decides who goes next.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .base import CommitResult, Incoming, SinkUnavailable, contiguous_upto

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
    ts REAL NOT NULL, priority INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    received REAL NOT NULL,
    PRIMARY KEY (device, boot, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_received ON records (received);
CREATE TABLE IF NOT EXISTS rejected (
    device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
    size INTEGER NOT NULL, reason TEXT NOT NULL, received REAL NOT NULL,
    PRIMARY KEY (device, boot, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL, boot TEXT NOT NULL, upto INTEGER NOT NULL, PRIMARY KEY (device, boot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES
    ('batches', 0), ('received', 0), ('records', 0), ('duplicates', 0), ('malformed', 0), ('rejected', 0);
CREATE TABLE IF NOT EXISTS malformed (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, reason TEXT NOT NULL, received REAL NOT NULL
);
"""


class SqliteSink:
    """Tables ``records``, ``rejected`` (refused for size), per-boot ``watermarks``, ``counters``, ``malformed``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an ack promises the records are on disk
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(watermarks)")}
            if "updated" not in columns:  # files written before retention existed
                self._db.execute("ALTER TABLE watermarks ADD COLUMN updated REAL NOT NULL DEFAULT 0")
            self._writer = os.open(f"{self.path}-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except (sqlite3.Error, OSError) as exc:
            raise SinkUnavailable(f"cannot open ingest database {self.path}: {exc}") from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's lock, then the advisory lock every writer of the file queues on."""
        with self._lock:
            fcntl.flock(self._writer, fcntl.LOCK_EX)  # blocks without the GIL
            try:
                yield
            finally:
                fcntl.flock(self._writer, fcntl.LOCK_UN)

    def commit(self, batches: Sequence[Incoming]) -> CommitResult:
        now = time.time()
        result = CommitResult()
        with self._writing():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for item in batches:
                        self._commit_one(item, now, result)
                    received = sum(item.received for item in batches)
                    self._db.executemany("UPDATE counters SET value = value + ? WHERE name = ?", [
                        (len(batches), "batches"), (received, "received"), (result.new, "records"),
                        (result.duplicates, "duplicates"), (result.rejected, "rejected")])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise SinkUnavailable(f"ingest database {self.path}: commit failed: {exc}") from None
        return result

    def _commit_one(self, item: Incoming, now: float, result: CommitResult) -> None:
        device, boot = item.key
        row = self._db.execute("SELECT upto FROM watermarks WHERE device = ? AND boot = ?", (device, boot)).fetchone()
        # Below the floor the device holds nothing any more (acked, or dropped by its quota).
        upto = max(row[0] if row else 0, item.floor - 1)
        before = self._db.total_changes
        self._db.executemany(
            "INSERT OR IGNORE INTO records (device, boot, seq, ts, priority, kind, data, received) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(device, boot, *r, now) for r in item.records])
        new = self._db.total_changes - before
        self._db.executemany(
            "INSERT OR IGNORE INTO rejected (device, boot, seq, size, reason, received) VALUES (?, ?, ?, ?, ?, ?)",
            [(device, boot, r.seq, r.size, r.reason, now) for r in item.rejected])
        upto = self._advance(device, boot, upto)
        self._db.execute(
            "INSERT INTO watermarks (device, boot, upto, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device, boot) DO UPDATE SET upto = excluded.upto, updated = excluded.updated",
            (device, boot, upto, now))
        result.new += new
        result.duplicates += len(item.records) - new
        result.rejected += len(item.rejected)
        result.upto[item.key] = upto

    def _advance(self, device: str, boot: str, upto: int) -> int:
        """Move over every contiguous settled (stored or rejected) sequence above ``upto``."""
        while True:
            seqs = [s for (s,) in self._db.execute(
                "SELECT seq FROM records WHERE device = ?1 AND boot = ?2 AND seq > ?3 "
                "UNION SELECT seq FROM rejected WHERE device = ?1 AND boot = ?2 AND seq > ?3 ORDER BY seq LIMIT 1000",
                (device, boot, upto))]
            moved = contiguous_upto(upto, seqs)
            if len(seqs) < 1000 or moved < seqs[-1]:
                return moved
            upto = moved

    def count_malformed(self, device: str | None, reason: str) -> None:
        with self._writing():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'malformed'")
                self._db.execute("INSERT INTO malformed (device, reason, received) VALUES (?, ?, ?)",
                                 (device, reason[:500], time.time()))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SinkUnavailable(f"ingest database {self.path}: cannot count a malformed batch: {exc}") from None

    def prune(self, max_age_s: float) -> int:
        cutoff = time.time() - max_age_s
        with self._writing():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                deleted = self._db.execute("DELETE FROM records WHERE received < ?", (cutoff,)).rowcount
                self._db.execute("DELETE FROM rejected WHERE received < ?", (cutoff,))
                self._db.execute("DELETE FROM malformed WHERE received < ?", (cutoff,))
                self._db.execute("DELETE FROM watermarks WHERE updated < ?", (cutoff,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SinkUnavailable(f"ingest database {self.path}: retention failed: {exc}") from None
        return deleted

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._writer)
