"""Fetch the chunks a release needs from a chunk store into the device's local chunk store.

Store-agnostic: several chunks are in flight at once (``workers`` threads, each one blocking
request at a time, so the same loop drives HTTP keep-alive connections, S3 requests or MQTT
subscriptions). Every chunk is verified against the manifest (size and sha256) before it is
stored, durably, by :class:`~edge_sdk.runtime.sync.chunk_store.ChunkStore`; bytes that do not
match are never stored, are counted, and the chunk is asked for again (a CDN edge may have held
a bad copy); a chunk that stays wrong ends the attempt with a ``corrupt_chunk``
:class:`StoreError`, so the caller reports it and retries later. The first store error ends the
attempt too: what was stored so far stays, and the next attempt fetches only the rest.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

from .chunk_store import ChunkStore
from .stores import Store, StoreError


@dataclass
class FetchStats:
    chunks: int = 0
    bytes: int = 0
    corrupt: int = 0  # deliveries refused because their bytes did not match the manifest


def fetch_missing(store: Store, local: ChunkStore, missing: list[ChunkRef], deadline: float, *, workers: int = 8,
                  corrupt_retries: int = 1, on_chunk: Callable[[ChunkRef], None] | None = None,
                  on_corrupt: Callable[[ChunkRef, str], None] | None = None,
                  cancel: threading.Event | None = None) -> FetchStats:
    """Fetch ``missing`` from ``store`` into ``local``; see the module docstring. Setting ``cancel``
    ends the attempt at once (a :class:`SyncError`); requests in flight finish in the background
    (the workers are daemon threads, so they never hold up a process that exits)."""
    stats = FetchStats()
    lock = threading.Lock()
    todo: queue.SimpleQueue[ChunkRef] = queue.SimpleQueue()
    for ref in missing:
        todo.put(ref)
    errors: list[BaseException] = []
    left = [len(missing)]
    finished = threading.Event()

    def stopped() -> bool:
        return bool(errors) or (cancel is not None and cancel.is_set())

    def one(ref: ChunkRef) -> None:
        for attempt in range(corrupt_retries + 1):
            data = store.fetch(ref, deadline)
            try:
                local.put(ref.sha256, data, ref.size)
            except IntegrityError as exc:
                with lock:
                    stats.corrupt += 1
                if on_corrupt is not None:
                    on_corrupt(ref, str(exc))
                if attempt == corrupt_retries:
                    raise StoreError(f"{store.url} served wrong bytes for chunk {ref.sha256[:12]}… "
                                     f"{attempt + 1} times: {exc}", ErrorKind.CORRUPT_CHUNK) from None
                continue
            with lock:
                stats.chunks += 1
                stats.bytes += ref.size
            if on_chunk is not None:
                on_chunk(ref)
            return

    def work() -> None:
        while not stopped():
            try:
                ref = todo.get_nowait()
            except queue.Empty:
                return
            try:
                one(ref)
            except BaseException as exc:  # the first error ends the attempt
                with lock:
                    errors.append(exc)
                finished.set()
                return
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

    if not missing:
        return stats
    threads = [threading.Thread(target=work, name="chunk-fetch", daemon=True)
               for _ in range(max(1, min(workers, len(missing))))]
    for thread in threads:
        thread.start()
    while not finished.wait(0.2):
        if cancel is not None and cancel.is_set():
            raise SyncError(f"fetching from {store.url} stopped with {left[0]} chunks still missing")
    if errors:
        raise errors[0]
    return stats
