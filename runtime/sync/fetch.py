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

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from edge_sdk.errors import IntegrityError
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
                  on_corrupt: Callable[[ChunkRef, str], None] | None = None) -> FetchStats:
    """Fetch ``missing`` from ``store`` into ``local``; see the module docstring."""
    stats = FetchStats()
    lock = threading.Lock()
    cancelled = threading.Event()

    def one(ref: ChunkRef) -> None:
        for attempt in range(corrupt_retries + 1):
            if cancelled.is_set():
                return
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

    if not missing:
        return stats
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing))), thread_name_prefix="chunk-fetch") as pool:
        futures = [pool.submit(one, ref) for ref in missing]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            cancelled.set()
            for future in futures:
                future.cancel()
            raise failed.exception()
    return stats
