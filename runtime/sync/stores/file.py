"""``file:///dir``: chunks as ``<dir>/<sha256>`` files, e.g. the folder nginx or a CDN origin serves.

Written atomically (temporary file, fsync, rename), so a server never serves half a chunk.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edge_sdk.errors import ConfigError
from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

from .base import Store, StoredChunk, StoreError, StoreOptions

_SHA256 = re.compile(r"[0-9a-f]{64}")


class FileStore(Store):
    scheme = "file"

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(url, options)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"chunk store {url!r}: file:// URLs name a local folder (file:///path)")
        self.root = Path(unquote(parts.path))

    def _path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(self, ref: ChunkRef, deadline: float) -> bytes:
        try:
            data = self._path(ref.sha256).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"chunk {ref.sha256[:12]}… is not in {self.root}", ErrorKind.CHUNK_MISSING) from None
        except OSError as exc:
            raise StoreError(f"chunk {ref.sha256[:12]}…: cannot read {self.root}: {exc}") from None
        self.counters["chunks_fetched"] += 1
        return data

    def present(self, shas: Collection[str]) -> set[str]:
        return {sha for sha in shas if self._path(sha).is_file()}

    def listing(self) -> Iterator[StoredChunk]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if _SHA256.fullmatch(entry.name) and entry.is_file():
                stat = entry.stat()
                yield StoredChunk(entry.name, stat.st_size, stat.st_mtime)

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def put(self, sha256: str, data: bytes) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{sha256[:12]}.", dir=self.root)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)  # served by another user (nginx)
                os.replace(tmp, self._path(sha256))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write chunk {sha256[:12]}… to {self.root}: {exc}") from None
        self.counters["chunks_put"] += 1
        self.counters["bytes_sent"] += len(data)
