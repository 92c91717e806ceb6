"""The sink protocol: what ingest hands a database, and what it gets back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from edge_sdk.errors import SyncError


class SinkUnavailable(SyncError):
    """The database cannot be reached or refused the transaction; nothing of it was committed.

    Ingest retries the same batches and acks nothing meanwhile, so devices keep their records.
    """


class StoredRecord(NamedTuple):
    """One record as a sink stores it (a tuple: ingest makes one per record, so it must be cheap)."""

    seq: int
    ts: float
    priority: int
    kind: str
    data: str  # the record's data as JSON text


@dataclass(frozen=True)
class Rejection:
    """A record refused (over the size limit): never stored, but settled, so the device drops it."""

    seq: int
    size: int
    reason: str


@dataclass(frozen=True)
class Incoming:
    """One checked telemetry batch of one device and boot, ready to commit."""

    device: str
    boot: str
    floor: int
    records: tuple[StoredRecord, ...] = ()
    rejected: tuple[Rejection, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.device, self.boot

    @property
    def received(self) -> int:
        return len(self.records) + len(self.rejected)


@dataclass
class CommitResult:
    """Totals of one commit, and per (device, boot) the highest sequence ``upto`` such that every
    sequence from the floor to it is settled (stored or rejected): what the device may delete."""

    new: int = 0
    duplicates: int = 0
    rejected: int = 0
    upto: dict[tuple[str, str], int] = field(default_factory=dict)


class Sink(Protocol):
    """Where ingest puts records. ``commit`` is durable and atomic for all its batches before it
    returns, or raises :class:`SinkUnavailable` having committed nothing."""

    def commit(self, batches: Sequence[Incoming]) -> CommitResult: ...

    def count_malformed(self, device: str | None, reason: str) -> None: ...

    def prune(self, max_age_s: float) -> int:
        """Delete records received more than ``max_age_s`` ago; returns how many."""
        ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def contiguous_upto(start: int, seqs: Sequence[int]) -> int:
    """The highest ``n`` with every one of ``start+1 … n`` in ascending ``seqs`` (``start`` if none)."""
    upto = start
    for seq in seqs:
        if seq > upto + 1:
            break
        upto = max(upto, seq)
    return upto
