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
* Quota (``max_rows``, and ``max_bytes`` for the whole footprint on disk: database pages, the
  WAL, whose size is bounded by checkpoints, and its index) with an explicit policy: ``reject``
  raises :class:`OutboxFullError`; ``drop_oldest`` deletes the oldest records whose priority is
  not higher than the new one's (lowest priority first) and counts them in ``dropped`` — never
  silently. If nothing may be dropped, it raises :class:`OutboxFullError` as well. Space is
  measured (pages in use after the insert), not estimated from payload sizes.
* The disk is a quota too: an append does not grow the database into the last ``reserve_bytes``
  of the file system (only one commit's WAL pages may dip into it), so the policy runs *before*
  the disk fills, and acks and loss counters can still commit. If
  SQLite still reports a full disk, the append is refused and counted; an ack that cannot be
  committed is remembered (those records are not sent again) and retried; a loss counter that
  cannot be saved is kept in memory and saved with the next commit.
* A database SQLite calls corrupt is moved aside (``outbox.db.corrupt-<time>``) and a fresh one
  created, at open or when a later statement finds the damage; :attr:`Outbox.recovered` says so.
* A disk too full to even create or open the database does not fail the constructor: the outbox
  starts *disabled* (:attr:`Outbox.disabled` says why; appends are refused and counted, batches
  are empty) and opens itself once space returns, checked at most every ``REOPEN_S`` on use.
* Records leave only through :meth:`ack` (or the drop policy). Freed pages are given back to the
  file system (``auto_vacuum=INCREMENTAL`` plus ``journal_size_limit``).
* Upload order is FIFO (``id``); priority decides what survives a full outbox, not what is sent
  first, so the ingest's "highest contiguous sequence" ack keeps moving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
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
log = logging.getLogger(__name__)

# Fixed per-row overhead added to the payload size of each record (the ``bytes`` figure).
ROW_OVERHEAD = 48
#: Largest record (a telemetry batch of one record must stay under the wire limit).
MAX_RECORD_BYTES = 512 * 1024
#: The WAL index file (``-shm``) beside the database.
_SHM_BYTES = 32 * 1024
_CORRUPT = ("malformed", "not a database", "file is encrypted")
#: a disabled outbox (disk full at open) tries to open again at most this often
REOPEN_S = 2.0


class Priority(IntEnum):
    """Record priority: under ``drop_oldest`` lower priorities are dropped first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


class OutboxConfig(StrictModel):
    """Where the outbox lives and how big it may grow."""

    path: Path
    max_rows: int = Field(1_000_000, ge=1)
    #: the whole footprint on disk: database file, WAL and WAL index
    max_bytes: int = Field(256 * 1024 * 1024, ge=256 * 1024)
    on_full: OutboxPolicy = OutboxPolicy.REJECT
    max_record_bytes: int = Field(MAX_RECORD_BYTES, ge=64, le=MAX_RECORD_BYTES)
    #: free disk space appends leave untouched, for acks and loss counters
    reserve_bytes: int = Field(256 * 1024, ge=0)

    @property
    def wal_bytes(self) -> int:
        """What the WAL may hold between checkpoints (part of ``max_bytes``)."""
        return min(4 << 20, max(64 << 10, self.max_bytes // 16))


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
    #: database + WAL + WAL index on disk now
    file_bytes: int = 0
    #: why the outbox is not storing anything (None while it works); see :attr:`Outbox.disabled`
    disabled: str | None = None


class Outbox:
    """A durable FIFO of telemetry records. Thread-safe; see the module docstring."""

    def __init__(self, config: OutboxConfig) -> None:
        self.config = config
        self.boot_id = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        #: acks that could not be committed (disk full): boot -> upto, retried on every call
        self._settled: dict[str, int] = {}
        #: loss counters that could not be saved yet; added to the next commit
        self._unsaved: Counter[str] = Counter()
        self._boot_saved = False
        #: where a corrupt database was moved, and why (None while nothing was recovered)
        self.recovered: dict[str, str] | None = None
        #: why nothing can be stored (the disk was too full to open the database); None when open
        self.disabled: str | None = None
        self._db: sqlite3.Connection | None = None
        self._reopen_at = 0.0
        self._try_open()

    def _try_open(self) -> None:
        """Open (creating, or replacing a corrupt file); a full disk leaves the outbox disabled."""
        config = self.config
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._open()
            except sqlite3.DatabaseError as exc:
                if not _is_corrupt(exc):
                    raise
                self._move_aside(exc)
                self._open()
        except (OSError, sqlite3.Error) as exc:
            if not (_is_disk_full(exc) if isinstance(exc, sqlite3.Error) else exc.errno == errno.ENOSPC):
                raise SyncError(f"cannot open outbox {config.path}: {exc}") from None
            self._db = None
            self._reopen_at = time.monotonic() + REOPEN_S
            if self.disabled is None:
                log.error("outbox %s disabled: the disk is full (%s); telemetry is refused and counted until "
                          "space returns", config.path, exc)
            self.disabled = f"the disk is full ({exc})"
            return
        if self.disabled is not None:
            log.warning("outbox %s enabled again: space returned", config.path)
        self.disabled = None

    def _usable(self) -> bool:
        """True if the database is open, trying again if it is time (caller holds the lock)."""
        if self._db is None and time.monotonic() >= self._reopen_at:
            self._try_open()
        return self._db is not None

    def _open(self) -> None:
        config = self.config
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is held open.
        self._db = sqlite3.connect(str(config.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # effective only on a new file
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise SyncError(f"outbox {config.path}: SQLite refused WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._page = self._db.execute("PRAGMA page_size").fetchone()[0]
            # Checkpoint at a quarter of the WAL budget (one transaction may add several pages
            # before the checkpoint runs), truncate it to the budget afterwards.
            self._wal_pages_max = max(4, config.wal_bytes // self._page // 4)
            self._wal_pages = 0
            self._db.execute(f"PRAGMA journal_size_limit={config.wal_bytes}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise SyncError(f"outbox {config.path} has schema version {version}, expected {_SCHEMA_VERSION}")
            if version == 0:
                # Every statement is idempotent, so concurrent openers of a new file cannot clash.
                self._db.executescript(_SCHEMA + f"PRAGMA user_version={_SCHEMA_VERSION};")
            self._db.execute("SELECT COUNT(*) FROM counters").fetchone()  # reads the schema: finds a bad header
        except BaseException:
            self._db.close()
            raise
        # The quota in pages: what is left of max_bytes after the WAL (its frames carry a 24-byte
        # header each, the file a 32-byte one) and its index.
        wal = config.wal_bytes + config.wal_bytes // self._page * 24 + 32
        self._quota_pages = max(8, (config.max_bytes - wal - _SHM_BYTES) // self._page)

    def _move_aside(self, exc: Exception) -> None:
        """Keep a corrupt database for inspection and start afresh (telemetry must go on)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.config.path.with_name(f"{self.config.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.config.path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{target}{suffix}"))
        self.recovered = {"moved_to": str(target), "reason": str(exc)}
        log.error("outbox %s is corrupt (%s): moved to %s, starting a fresh one", self.config.path, exc, target)

    def _recover_if_corrupt(self, exc: sqlite3.Error) -> None:
        """At run time: replace a database found corrupt by a fresh one (caller holds the lock)."""
        if not _is_corrupt(exc):
            return
        self._db.close()
        self._move_aside(exc)
        self._settled.clear()
        self._boot_saved = False
        self._open()

    # -- writing -------------------------------------------------------------------------------
    def append(self, data: Any, kind: str = "record", priority: Priority | int = Priority.NORMAL, ts: float | None = None) -> int:
        """Store one JSON-serialisable record durably; returns its sequence number in this boot.

        Raises :class:`OutboxFullError` when the quota or the disk is full and the policy does
        not allow making room, :class:`SyncError` for an unserialisable record or a storage failure.
        """
        return self.append_many([data], kind=kind, priority=priority, ts=ts)[-1]

    def append_many(
        self, items: list[Any], kind: str = "record", priority: Priority | int = Priority.NORMAL, ts: float | None = None,
        *, essential: bool = False,
    ) -> list[int]:
        """Store several records in one durable transaction (one fsync); all or none are stored.

        ``essential`` records (loss reports) skip the quota and may use the disk reserve.
        """
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
        with self._lock:
            if not self._usable():
                self._unsaved.update(rejected=need_rows)  # saved with the first commit once open
                raise OutboxFullError(f"outbox {self.config.path} is disabled: {self.disabled}; "
                                      f"{need_rows} record(s) refused")
        too_big = max(sizes) > self.config.max_record_bytes
        if too_big or need_rows > self.config.max_rows or need_bytes > self._quota_pages * self._page:
            with self._lock:
                self._count_loss(rejected=need_rows)
            what = f"a record of {max(sizes)} bytes exceeds max_record_bytes ({self.config.max_record_bytes})" if too_big \
                else f"{need_rows} record(s) of {need_bytes} bytes exceed the outbox quota"
            raise OutboxFullError(f"outbox {self.config.path}: {what} ({self.config.max_rows} rows, "
                                  f"{self.config.max_bytes} bytes on disk)")
        now = time.time() if ts is None else float(ts)
        with self._lock:
            self._retry_settled()
            try:
                self._disk_room_pages(self.config.reserve_bytes)  # checkpoint interval for the free space
            except sqlite3.Error as exc:
                log.warning("outbox %s: checkpoint failed: %s", self.config.path, exc)
            first = self._seq + 1
            seqs = list(range(first, first + len(texts)))
            rows = [(self.boot_id, s, now, priority, kind, t, z) for s, t, z in zip(seqs, texts, sizes)]
            try:
                with self._tx():
                    if not self._boot_saved:
                        self._db.execute("INSERT OR IGNORE INTO boots (boot, started) VALUES (?, ?)",
                                         (self.boot_id, time.time()))
                    count, _ = self._usage()
                    if not essential and count + need_rows > self.config.max_rows:
                        self._make_room_rows(count + need_rows - self.config.max_rows, priority)
                    self._insert_fitting(rows, priority, essential)
                    self._bump(rows=need_rows, bytes=need_bytes, appended=need_rows, **self._unsaved)
            except OutboxFullError:
                self._count_loss(rejected=need_rows)
                raise
            except sqlite3.Error as exc:
                if _is_disk_full(exc):
                    self._count_loss(rejected=need_rows)
                    raise OutboxFullError(f"outbox {self.config.path}: the disk is full ({exc}); "
                                          f"{need_rows} record(s) refused") from None
                self._recover_if_corrupt(exc)
                raise SyncError(f"outbox {self.config.path}: append failed: {exc}") from None
            self._unsaved.clear()
            self._boot_saved = True
            self._seq = seqs[-1]  # only after the commit: a failed append consumes no sequence
        return seqs

    def _insert_fitting(self, rows: list[tuple], priority: int, essential: bool) -> None:
        """Insert ``rows`` so that the pages in use stay within the quota and the file grows no
        more than the free disk space (minus the reserve) allows; measured, not estimated.

        An insert that does not fit is rolled back to a savepoint; ``drop_oldest`` then frees at
        least as many pages as were missing and tries again.
        """
        start_pages = self._pages()[0]
        room = self._disk_room_pages(0 if essential else self.config.reserve_bytes, in_tx=True)
        for _ in range(64):
            self._db.execute("SAVEPOINT fit")
            self._db.executemany(
                "INSERT INTO records (boot, seq, ts, priority, kind, data, size) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )
            pages, free = self._pages()
            over_disk = pages - (start_pages + room)
            over_quota = 0 if essential else pages - free - self._quota_pages
            missing = max(over_disk, over_quota)
            if missing <= 0:
                self._db.execute("RELEASE fit")
                return
            self._db.execute("ROLLBACK TO fit")
            self._db.execute("RELEASE fit")
            where = "the disk is nearly full" if over_disk >= over_quota else "the outbox is at its quota"
            if self.config.on_full is OutboxPolicy.REJECT or essential:
                raise OutboxFullError(
                    f"outbox {self.config.path}: {where} ({pages * self._page} bytes of pages, quota "
                    f"{self.config.max_bytes} bytes on disk, {self.config.reserve_bytes} bytes of disk kept free; "
                    f"policy {self.config.on_full.value})"
                )
            self._drop_pages(missing, priority, where)
        raise OutboxFullError(f"outbox {self.config.path}: no room could be made for {len(rows)} record(s)")

    def _drop_pages(self, pages: int, priority: int, why: str) -> None:
        """Drop the oldest records of priority ≤ ``priority`` until ``pages`` more pages are free."""
        target = self._pages()[1] + pages
        cursor = self._db.execute("SELECT id, size FROM records WHERE priority <= ? ORDER BY priority, id", (priority,))
        batch: list[tuple[int, int]] = []
        budget = pages * self._page
        for rid, size in cursor:
            batch.append((rid, size))
            budget -= size
            if budget > 0:
                continue
            self._delete_dropped(batch)
            batch = []
            free = self._pages()[1]
            if free >= target:
                cursor.close()
                return
            budget = (target - free) * self._page
        cursor.close()
        if batch:
            self._delete_dropped(batch)
            if self._pages()[1] >= target:
                return
        raise OutboxFullError(f"outbox {self.config.path}: {why} and no record of priority ≤ {priority} is left to drop")

    def _make_room_rows(self, excess: int, priority: int) -> None:
        if self.config.on_full is OutboxPolicy.REJECT:
            raise OutboxFullError(
                f"outbox {self.config.path} is full ({self.config.max_rows} rows; policy reject)"
            )
        victims = self._db.execute(
            "SELECT id, size FROM records WHERE priority <= ? ORDER BY priority, id LIMIT ?", (priority, excess)
        ).fetchall()
        if len(victims) < excess:
            raise OutboxFullError(
                f"outbox {self.config.path} is full of records with priority above {priority}; nothing may be dropped"
            )
        self._delete_dropped(victims)

    def _delete_dropped(self, victims: list[tuple[int, int]]) -> None:
        self._db.executemany("DELETE FROM records WHERE id = ?", [(i,) for i, _ in victims])
        self._bump(rows=-len(victims), bytes=-sum(z for _, z in victims), dropped=len(victims))

    def ack(self, boot: str, upto: int) -> int:
        """Delete every record of ``boot`` with ``seq <= upto`` (ingest committed them); returns how many.

        On a full disk the deletion is remembered instead (those records are not returned by
        :meth:`next_batch` again) and retried with every later call; returns 0 then.
        """
        with self._lock:
            if not self._usable():
                return 0  # nothing was stored, so nothing of this boot was sent
            self._retry_settled()
            try:
                return self._delete_acked(boot, upto)
            except sqlite3.Error as exc:
                if not _is_disk_full(exc):
                    self._recover_if_corrupt(exc)
                    raise SyncError(f"outbox {self.config.path}: ack failed: {exc}") from None
                self._settled[boot] = max(upto, self._settled.get(boot, 0))
                log.warning("outbox %s: disk full, ack of %s up to %d kept in memory until it can be committed",
                            self.config.path, boot, upto)
                return 0

    def _delete_acked(self, boot: str, upto: int) -> int:
        with self._tx():
            n, freed = self._db.execute(
                "SELECT COUNT(*), TOTAL(size) FROM records WHERE boot = ? AND seq <= ?", (boot, upto)
            ).fetchone()
            if n:
                self._db.execute("DELETE FROM records WHERE boot = ? AND seq <= ?", (boot, upto))
            self._bump(rows=-n, bytes=-int(freed), acked=n, **self._unsaved)
            if boot != self.boot_id and not self._db.execute(
                "SELECT 1 FROM records WHERE boot = ? LIMIT 1", (boot,)
            ).fetchone():
                self._db.execute("DELETE FROM boots WHERE boot = ?", (boot,))
        self._unsaved.clear()
        if self._settled.get(boot, upto + 1) <= upto:
            del self._settled[boot]
        if n:
            try:  # executescript steps the pragma to completion (execute() frees one page per step)
                self._db.executescript("PRAGMA incremental_vacuum;")  # give freed pages back to the disk
            except sqlite3.Error as exc:  # the pages stay free for later appends
                log.warning("outbox %s: could not give freed pages back: %s", self.config.path, exc)
        return n

    def _retry_settled(self) -> None:
        for boot, upto in list(self._settled.items()):
            try:
                self._delete_acked(boot, upto)
            except sqlite3.Error:
                return

    # -- reading -------------------------------------------------------------------------------
    def next_batch(self, after_id: int = 0, max_records: int = 500, max_bytes: int = 256 * 1024) -> Batch | None:
        """The oldest records with ``id > after_id``, all of one boot, within the limits (≥ 1 record)."""
        with self._lock:
            if not self._usable():
                return None
            self._retry_settled()
            skip = "".join(" AND NOT (boot = ? AND seq <= ?)" for _ in self._settled)
            skip_args = [v for item in self._settled.items() for v in item]
            try:
                rows = self._db.execute(
                    "SELECT id, boot, seq, ts, priority, kind, data, size FROM records WHERE id > ?"
                    f"{skip} ORDER BY id LIMIT ?",
                    (after_id, *skip_args, max_records),
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
                floor = self._db.execute("SELECT MIN(seq) FROM records WHERE boot = ? AND seq > ?",
                                         (boot, self._settled.get(boot, 0))).fetchone()[0]
            except sqlite3.Error as exc:
                self._recover_if_corrupt(exc)
                raise SyncError(f"outbox {self.config.path}: read failed: {exc}") from None
        return Batch(boot, floor, tuple(picked))

    def stats(self) -> OutboxStats:
        with self._lock:
            if not self._usable():
                c = Counter(self._unsaved)
                return OutboxStats(self.boot_id, 0, 0, c["appended"], c["dropped"], c["rejected"], c["acked"], 0,
                                   self.disabled)
            try:
                c = Counter(dict(self._db.execute("SELECT name, value FROM counters").fetchall()))
            except sqlite3.Error as exc:
                self._recover_if_corrupt(exc)
                raise SyncError(f"outbox {self.config.path}: read failed: {exc}") from None
            c.update(self._unsaved)
            files = sum(os.stat(p).st_size for p in (f"{self.config.path}{x}" for x in ("", "-wal", "-shm"))
                        if os.path.exists(p))
        return OutboxStats(self.boot_id, c["rows"], c["bytes"], c["appended"], c["dropped"], c["rejected"], c["acked"],
                           files)

    def __len__(self) -> int:
        return self.stats().rows

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
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

    def _pages(self) -> tuple[int, int]:
        """(pages in the database file, pages on its freelist) as this transaction sees them."""
        return (self._db.execute("PRAGMA page_count").fetchone()[0],
                self._db.execute("PRAGMA freelist_count").fetchone()[0])

    def _disk_room_pages(self, reserve: int, in_tx: bool = False) -> int:
        """Pages the database may still grow by without taking the last ``reserve`` bytes.

        The WAL grows by every page a commit touches until the next checkpoint, so the checkpoint
        interval shrinks with the free space, and what the WAL may still grow to is kept free.
        Outside a transaction, a WAL that could outgrow the disk is checkpointed and truncated.
        """
        try:
            st = os.statvfs(self.config.path.parent)
            wal = os.stat(f"{self.config.path}-wal").st_size if os.path.exists(f"{self.config.path}-wal") else 0
            on_disk = os.stat(self.config.path).st_size
        except OSError:
            return 1 << 40
        # Pages in the WAL that the database file will grow by at the next checkpoint.
        pending = max(0, self._pages()[0] * self._page - on_disk)
        free = st.f_bavail * st.f_frsize - reserve - pending
        frame = self._page + 24
        wal_pages = max(4, min(self._wal_pages_max, free // 8 // frame))
        if wal_pages != self._wal_pages and not in_tx:
            self._db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            self._wal_pages = wal_pages
        peak = 2 * self._wal_pages * frame  # the WAL peaks near twice the checkpoint size
        if not in_tx and wal > peak and free < 2 * self._wal_pages_max * frame:
            # Short of space, a WAL left large by earlier commits gives its space back.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return self._disk_room_pages(reserve, in_tx=True)
        headroom = max(0, peak - wal)
        # A new page is written to the WAL first and to the database at the checkpoint.
        return max(0, (free - headroom) // 2 // self._page)

    def _bump(self, **deltas: int) -> None:
        self._db.executemany(
            "UPDATE counters SET value = value + ? WHERE name = ?", [(v, k) for k, v in deltas.items() if v]
        )

    def _count_loss(self, **deltas: int) -> None:
        """Persist refused/dropped counts (caller holds the lock); kept in memory if that fails."""
        self._unsaved.update(deltas)
        try:
            with self._tx():
                self._bump(**self._unsaved)
        except sqlite3.Error:  # counting must not hide the OutboxFullError being raised
            return
        self._unsaved.clear()


def _is_disk_full(exc: sqlite3.Error) -> bool:
    return "full" in str(exc).lower() or getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL


def _is_corrupt(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(word in str(exc).lower() for word in _CORRUPT)


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
