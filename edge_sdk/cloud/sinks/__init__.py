"""Where cloud ingest commits telemetry, one module per database, registered by URL scheme.

``open_sink("ingest.db")`` (a path, or ``sqlite:///path``) is the embedded SQLite sink;
``open_sink("postgresql://user@host/db")`` the PostgreSQL one (psycopg 3, the ``postgres`` extra).
"""

from __future__ import annotations

from pathlib import Path

from edge_sdk.registry import Registry

from .base import CommitResult, Incoming, Rejection, Sink, SinkUnavailable, StoredRecord

SINKS: Registry[type] = Registry("ingest database")
SINKS.register_lazy("sqlite", "edge_sdk.cloud.sinks.sqlite:SqliteSink")
SINKS.register_lazy("postgresql", "edge_sdk.cloud.sinks.postgres:PostgresSink")


def sink_kind(db: str | Path) -> str:
    """``postgresql`` for a ``postgresql://``/``postgres://`` URL, ``sqlite`` for a path or ``sqlite:///…``."""
    text = str(db)
    scheme = text.partition("://")[0].lower() if "://" in text else "sqlite"
    return {"postgres": "postgresql"}.get(scheme, scheme)


def open_sink(db: str | Path, worker: str = "ingest") -> Sink:
    """Open the sink ``db`` names; ``worker`` keys this process's counters where the database keeps them per worker."""
    kind = sink_kind(db)
    text = str(db)
    if kind == "sqlite":
        return SINKS.get("sqlite")(text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else text)
    return SINKS.get(kind)(text, worker=worker)


__all__ = ["CommitResult", "Incoming", "Rejection", "SINKS", "Sink", "SinkUnavailable", "StoredRecord", "open_sink", "sink_kind"]
