"""The PostgreSQL sink (psycopg 3, the ``postgres`` extra): many workers on many machines.

Exactly one row per record however many workers share the ``$share`` subscription: the
``(device, boot, seq)`` primary key drops duplicates (``ON CONFLICT DO NOTHING``, counted). A
commit writes its rows, then takes the watermark rows of its (device, boot) keys with one ``INSERT
… ON CONFLICT DO UPDATE`` in sorted key order, which serialises two workers' watermark moves for
one device (the second, in a fresh READ COMMITTED snapshot, sees the first's rows and moves the
watermark over both) without deadlocks — no watermark lock is held while rows are written, so a
wait on another transaction's duplicate key cannot close a cycle; a deadlock or serialization
failure anyway is retried. Records go in with one ``COPY`` per commit
(into a temporary table first, then ``INSERT … ON CONFLICT DO NOTHING``, only when the direct
COPY hits a duplicate), and one commit carries every batch that arrived while the previous ran.

Counters are kept per worker (``counters(worker, name)``), so concurrent workers never wait on a
shared counter row; :meth:`PostgresSink.counters` adds them up. Retention deletes by ``received``
through a BRIN index (cheap to keep on append-mostly tables).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from edge_sdk.errors import MissingDependencyError, SyncError

from .base import CommitResult, Incoming, SinkUnavailable

log = logging.getLogger(__name__)

COUNTERS = ("batches", "received", "records", "duplicates", "malformed", "rejected")
_RETRIES = 5  # for deadlocks and serialization failures

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    device text NOT NULL, boot text NOT NULL, seq bigint NOT NULL,
    ts double precision NOT NULL, priority integer NOT NULL, kind text NOT NULL, data jsonb NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, boot, seq)
);
CREATE INDEX IF NOT EXISTS records_received ON records USING brin (received);
CREATE TABLE IF NOT EXISTS rejected (
    device text NOT NULL, boot text NOT NULL, seq bigint NOT NULL,
    size bigint NOT NULL, reason text NOT NULL, received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, boot, seq)
);
CREATE TABLE IF NOT EXISTS watermarks (
    device text NOT NULL, boot text NOT NULL, upto bigint NOT NULL, updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, boot)
);
CREATE TABLE IF NOT EXISTS counters (
    worker text NOT NULL, name text NOT NULL, value bigint NOT NULL, PRIMARY KEY (worker, name)
);
CREATE TABLE IF NOT EXISTS malformed (
    id bigserial PRIMARY KEY, worker text NOT NULL, device text, reason text NOT NULL,
    received timestamptz NOT NULL DEFAULT now()
);
"""

_LOCK_WATERMARKS = """
INSERT INTO watermarks (device, boot, upto)
SELECT k.device, k.boot, 0 FROM unnest(%s::text[], %s::text[]) AS k(device, boot) ORDER BY k.device, k.boot
ON CONFLICT (device, boot) DO UPDATE SET updated = now()
RETURNING device, boot, upto
"""

_COPY_RECORDS = "COPY records (device, boot, seq, ts, priority, kind, data) FROM STDIN"
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging (device text, boot text, seq bigint, ts double precision,
                                         priority integer, kind text, data jsonb) ON COMMIT DELETE ROWS
"""
_FROM_STAGING = """
INSERT INTO records (device, boot, seq, ts, priority, kind, data) SELECT * FROM staging ON CONFLICT DO NOTHING
"""

_INSERT_REJECTED = """
INSERT INTO rejected (device, boot, seq, size, reason)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[])
ON CONFLICT DO NOTHING
"""

# The watermark moves over the island of settled sequences that starts right above it: for
# ascending seqs, seq - row_number() is constant along a run without gaps.
_ADVANCE = """
UPDATE watermarks AS w SET updated = now(), upto = coalesce((
    SELECT max(s.seq) FROM (
        SELECT u.seq, u.seq - row_number() OVER (ORDER BY u.seq) AS island FROM (
            SELECT seq FROM records AS r WHERE r.device = k.device AND r.boot = k.boot AND r.seq > k.upto
            UNION
            SELECT seq FROM rejected AS x WHERE x.device = k.device AND x.boot = k.boot AND x.seq > k.upto
        ) AS u
    ) AS s WHERE s.island = k.upto), k.upto)
FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(device, boot, upto)
WHERE w.device = k.device AND w.boot = k.boot
RETURNING w.device, w.boot, w.upto
"""

_COUNT = """
INSERT INTO counters (worker, name, value) SELECT %s, c.name, c.value FROM unnest(%s::text[], %s::bigint[]) AS c(name, value)
ON CONFLICT (worker, name) DO UPDATE SET value = counters.value + excluded.value
"""


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value: str) -> str:
    """``value`` as a field of COPY's text format (backslash, tab, newline and CR escaped)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:  # most values have none: no translate
        return value.translate(_COPY_ESCAPES)
    return value


def _copy_text(batches: Sequence[Incoming]) -> tuple[int, str]:
    """Every record of ``batches`` as the text of one ``COPY records … FROM STDIN`` (one write
    instead of one ``write_row`` per record), and how many rows it holds."""
    lines = []
    for item in batches:
        head = f"{_copy_field(item.device)}\t{_copy_field(item.boot)}\t"
        lines.extend(f"{head}{r.seq}\t{r.ts!r}\t{r.priority}\t{_copy_field(r.kind)}\t{_copy_field(r.data)}\n"
                     for r in item.records)
    return len(lines), "".join(lines)


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise MissingDependencyError("psycopg", "postgres", "telemetry ingest into PostgreSQL") from None
    return psycopg


class PostgresSink:
    """Telemetry in PostgreSQL at ``url`` (``postgresql://user:pass@host:port/db``; libpq's options and
    environment apply). ``worker`` names this process's counter rows."""

    def __init__(self, url: str, worker: str = "ingest", connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.worker = worker
        self.connect_timeout_s = connect_timeout_s
        self._psycopg = _psycopg()
        self._lock = threading.Lock()
        self._conn = None
        with self._lock:
            self._connection()  # fail early on a bad URL or credentials; outages later are retried

    @property
    def where(self) -> str:
        """The URL without its password, for messages."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            info = conninfo_to_dict(self.url)
        except self._psycopg.Error:
            return "PostgreSQL"
        return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _connection(self):
        if self._conn is not None and not self._conn.closed:
            return self._conn
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, connect_timeout=max(1, round(self.connect_timeout_s)),
                                   application_name=f"edge-sdk-ingest:{self.worker}"[:63])
        except psycopg.Error as exc:
            raise SinkUnavailable(f"cannot connect to {self.where}: {str(exc).strip()}") from None
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(8140417)")  # workers starting together
                conn.execute(_SCHEMA)
        except psycopg.Error as exc:
            conn.close()
            raise SinkUnavailable(f"{self.where}: cannot create the ingest tables: {str(exc).strip()}") from None
        self._conn = conn
        return conn

    def _run(self, what: str, work):
        """Run ``work(conn)`` in one transaction: retried on deadlock and serialization failure,
        :class:`SinkUnavailable` when the server is gone, :class:`SyncError` for data it refuses."""
        psycopg = self._psycopg
        with self._lock:
            for attempt in range(_RETRIES):
                conn = self._connection()
                try:
                    with conn.transaction():
                        return work(conn)
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                    log.info("%s: %s, retrying (%d)", what, type(exc).__name__, attempt + 1)
                except psycopg.OperationalError as exc:
                    self._drop()
                    raise SinkUnavailable(f"{self.where}: {what} failed: {str(exc).strip()}") from None
                except psycopg.Error as exc:
                    if conn.closed or conn.broken:
                        self._drop()
                        raise SinkUnavailable(f"{self.where}: {what} failed: {str(exc).strip()}") from None
                    raise SyncError(f"{self.where}: {what} refused: {str(exc).strip()}") from None
            raise SinkUnavailable(f"{self.where}: {what} failed {_RETRIES} times on lock conflicts")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except self._psycopg.Error:
                pass
        self._conn = None

    def commit(self, batches: Sequence[Incoming]) -> CommitResult:
        return self._run("commit", lambda conn: self._commit(conn, batches))

    def _commit(self, conn, batches: Sequence[Incoming]) -> CommitResult:
        floors: dict[tuple[str, str], int] = {}
        for item in batches:
            floors[item.key] = max(floors.get(item.key, 0), item.floor - 1)
        keys = sorted(floors)
        cur = conn.cursor()
        rows = _copy_text(batches)
        rejected: list[list] = [[], [], [], [], []]
        for item in batches:
            for x in item.rejected:
                for column, value in zip(rejected, (item.device, item.boot, x.seq, x.size, x.reason)):
                    column.append(value)
        # Rows first, watermark locks last: another worker's commit of the same devices waits only
        # for our advance and COMMIT, not for our COPY (the workers' COPYs run side by side).
        new = self._insert_records(conn, rows) if rows[0] else 0
        if rejected[0]:
            cur.execute(_INSERT_REJECTED, rejected)
        cur.execute(_LOCK_WATERMARKS, ([k[0] for k in keys], [k[1] for k in keys]))
        upto = {(d, b): max(u, floors[(d, b)]) for d, b, u in cur.fetchall()}
        cur.execute(_ADVANCE, ([k[0] for k in keys], [k[1] for k in keys], [upto[k] for k in keys]))
        result = CommitResult(new=new, rejected=sum(len(i.rejected) for i in batches),
                              upto={(d, b): u for d, b, u in cur.fetchall()})
        result.duplicates = sum(len(i.records) for i in batches) - new
        counts = {"batches": len(batches), "received": sum(i.received for i in batches), "records": new,
                  "duplicates": result.duplicates, "rejected": result.rejected}
        cur.execute(_COUNT, (self.worker, list(counts), list(counts.values())))
        return result

    def _insert_records(self, conn, rows: tuple[int, str]) -> int:
        """COPY straight into ``records`` (the common case: no duplicates); when some row is already
        there, COPY into a temporary table and insert from it skipping duplicates. Returns rows added.
        ``rows``: how many, and their COPY text (:func:`_copy_text`)."""
        psycopg = self._psycopg
        count, text = rows
        try:
            with conn.transaction(), conn.cursor().copy(_COPY_RECORDS) as copy:  # a savepoint
                copy.write(text)
            return count
        except psycopg.errors.UniqueViolation:
            pass
        conn.execute(_STAGING)
        with conn.cursor().copy("COPY staging FROM STDIN") as copy:
            copy.write(text)
        return conn.execute(_FROM_STAGING).rowcount

    def count_malformed(self, device: str | None, reason: str) -> None:
        def work(conn) -> None:
            conn.execute("INSERT INTO malformed (worker, device, reason) VALUES (%s, %s, %s)",
                         (self.worker, device, reason[:500]))
            conn.execute(_COUNT, (self.worker, ["malformed"], [1]))

        self._run("counting a malformed batch", work)

    def prune(self, max_age_s: float) -> int:
        def work(conn) -> int:
            cutoff = "now() - make_interval(secs => %s)"
            deleted = conn.execute(f"DELETE FROM records WHERE received < {cutoff}", (max_age_s,)).rowcount
            for table, column in (("rejected", "received"), ("malformed", "received"), ("watermarks", "updated")):
                conn.execute(f"DELETE FROM {table} WHERE {column} < {cutoff}", (max_age_s,))
            return deleted

        return self._run("retention", work)

    def counters(self) -> dict[str, int]:
        found = self._run("reading counters", lambda conn: dict(
            conn.execute("SELECT name, sum(value)::bigint FROM counters GROUP BY name").fetchall()))
        return {name: int(found.get(name, 0)) for name in COUNTERS}

    def close(self) -> None:
        with self._lock:
            self._drop()
