"""The chunk-store protocol: where a fleet's content-addressed chunks live, named by a URL.

A release's manifest pins every chunk by sha256, so a store is untrusted: whatever bytes it
returns are checked by the device before they are used. Devices call :meth:`Store.fetch`
(thread-safe, so a client may fetch several chunks at once); the cloud side calls
:meth:`Store.present` to learn which chunks a store already has and :meth:`Store.put` for
those it lacks.

Every failure is a :class:`StoreError` whose ``kind`` says what went wrong (the twin counts
errors by kind): ``store_unreachable`` (after retries with backoff), ``chunk_missing`` (the
store answered that it has no such chunk), ``store_denied`` (credentials refused),
``oversized_message`` (an MQTT payload over the configured cap), ``store_error`` (anything
else the store answered).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

if TYPE_CHECKING:  # pragma: no cover
    from ..topics import Topics
    from ..transport import Transport

#: The default cap on one MQTT chunk message: chunks are at most 128 KiB (edge_sdk.chunking);
#: older releases were cut at up to 256 KiB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024


@dataclass(frozen=True)
class StoredChunk:
    sha256: str
    size: int
    modified: float  # unix time the store last wrote it


class StoreError(SyncError):
    """A chunk store failed; ``kind`` names how (see the module docstring)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.STORE_ERROR) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StoreOptions:
    """How to reach stores: TLS (the fleet CA), timeouts, retries, the MQTT link and message cap."""

    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    timeout_s: float = 30.0  # per request: connect, and each read
    retries: int = 5  # per chunk, with exponential backoff and jitter between attempts
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    stall_s: float = 5.0  # mqtt: subscribe again to a chunk not received after this
    transport: Transport | None = field(default=None, compare=False)  # the fleet's MQTT link (mqtt store)
    topics: Topics | None = field(default=None, compare=False)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): exponential, full jitter."""
        return random.uniform(0.5, 1.0) * min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))


class Store(ABC):
    """One chunk store. ``counters`` count requests and bytes as the store sees them."""

    scheme: str = ""

    def __init__(self, url: str, options: StoreOptions) -> None:
        self.url = url
        self.options = options
        self.counters: Counter[str] = Counter()

    # -- device side ---------------------------------------------------------------------------
    @abstractmethod
    def fetch(self, ref: ChunkRef, deadline: float) -> bytes:
        """The bytes stored under ``ref.sha256`` (not yet verified: the caller checks them)."""

    # -- cloud side ----------------------------------------------------------------------------
    @abstractmethod
    def present(self, shas: Collection[str]) -> set[str]:
        """Those of ``shas`` the store holds."""

    @abstractmethod
    def put(self, sha256: str, data: bytes) -> None:
        """Store one chunk under its sha256 (the caller has checked it)."""

    def intact(self, chunks: Mapping[str, bytes]) -> set[str]:
        """Those of ``chunks`` (sha256 → the bytes it names) the store holds byte for byte.

        The publisher asks before it skips a chunk, so a chunk corrupted or replaced in the store
        is sent again rather than trusted for being there. This default reads each one back;
        stores that can tell more cheaply override it.
        """
        deadline = time.monotonic() + self.options.timeout_s * (1 + self.options.retries)

        def same(item: tuple[str, bytes]) -> str | None:
            sha, data = item
            try:
                return sha if self.fetch(ChunkRef(sha256=sha, size=len(data)), deadline) == data else None
            except StoreError as exc:
                if exc.kind in ("chunk_missing", "store_error"):  # store_error: e.g. more bytes than listed
                    return None
                raise

        with ThreadPoolExecutor(8) as pool:
            return {sha for sha in pool.map(same, chunks.items()) if sha is not None}

    def flush(self) -> None:
        """Return once every :meth:`put` so far is durable on the store (for stores that batch)."""

    def listing(self) -> Iterator[StoredChunk]:
        """Every chunk the store holds (for ``cloud gc``); stores that cannot list raise ConfigError."""
        raise ConfigError(f"the {self.scheme} store cannot list its chunks: collect garbage where they are "
                          "stored (the folder or bucket behind the server)")

    def delete(self, sha256: str) -> None:
        """Remove one chunk (for ``cloud gc``)."""
        raise ConfigError(f"the {self.scheme} store cannot delete chunks")

    def close(self) -> None:
        """Release connections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _wait_before_retry(self, attempt: int, deadline: float, what: str, exc: BaseException) -> None:
        """Sleep before retry ``attempt``, or raise ``store_unreachable`` when retries or time are spent."""
        delay = self.options.backoff(attempt)
        if attempt > self.options.retries or time.monotonic() + delay > deadline:
            raise StoreError(f"{what}: {self.url} did not answer after {attempt} attempts ({exc})",
                             ErrorKind.STORE_UNREACHABLE) from None
        self.counters["retries"] += 1
        time.sleep(delay)
