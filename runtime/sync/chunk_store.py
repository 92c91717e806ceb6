"""The device's content-addressed chunk store: every chunk it ever fetched, keyed by sha256.

A chunk is stored once however many files, variants and releases share it, so an update fetches
only chunks the device has never seen. Writes are crash-safe: a chunk is written to a temporary
file, fsynced and renamed into place, so after a ``kill -9`` (or power loss) a chunk is either
complete and correct or absent, and a restarted sync resumes by fetching only what is absent.
Leftover temporary files are removed when the store is opened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from edge_sdk.chunking import sha256_bytes
from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import ChunkRef, FileEntry
from edge_sdk.types import ErrorKind

_TMP_SUFFIX = ".part"


def _hex_ok(sha256: str) -> bool:
    return len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)


def storage_error(what: str, exc: OSError) -> SyncError:
    """Translate an OSError while writing device storage (disk full gets its own wording)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        error = SyncError(f"{what}: disk full ({exc.strerror})")
    else:
        error = SyncError(f"{what}: {exc}")
    error.kind = ErrorKind.STORAGE  # type: ignore[attr-defined]  # the twin counts it under this name
    return error


class ChunkStore:
    """Chunks under ``root/<sha[:2]>/<sha>``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"*/*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if not _hex_ok(sha256):
            raise IntegrityError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, sha256: str, data: bytes, size: int | None = None) -> bool:
        """Store ``data`` under ``sha256`` after checking it; returns False if it was already there.

        Raises :class:`IntegrityError` (nothing stored) if the bytes do not hash to ``sha256`` or
        differ from the expected ``size``.
        """
        if size is not None and len(data) != size:
            raise IntegrityError(f"chunk {sha256[:12]}…: {len(data)} bytes, manifest says {size}")
        if sha256_bytes(data) != sha256:
            raise IntegrityError(f"chunk {sha256[:12]}…: content does not hash to its name")
        final = self.path(sha256)
        if final.is_file():
            return False
        tmp: Path | None = None
        try:
            final.parent.mkdir(exist_ok=True)
            # A name of its own: two models' syncs may store the same chunk at the same time.
            fd, name = tempfile.mkstemp(prefix=f"{sha256}.", suffix=_TMP_SUFFIX, dir=final.parent)
            tmp = Path(name)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise storage_error(f"storing chunk {sha256[:12]}…", exc) from None
        return True

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"chunk {sha256[:12]}… is not in the local store") from None

    def missing(self, refs: Iterable[ChunkRef]) -> list[ChunkRef]:
        """The distinct chunks of ``refs`` not in the store, in first-use order."""
        seen: set[str] = set()
        out = []
        for ref in refs:
            if ref.sha256 not in seen:
                seen.add(ref.sha256)
                if not self.has(ref.sha256):
                    out.append(ref)
        return out

    def assemble(self, entry: FileEntry, dest: Path) -> None:
        """Write ``entry``'s file to ``dest`` from stored chunks, verifying every chunk and the whole.

        The chunk sizes must add up to the declared size, and every chunk must have its declared
        size, so nothing past the declared size is ever written. A chunk that fails its hash is
        deleted from the store (so the next sync fetches it again) and :class:`IntegrityError` is
        raised.
        """
        declared = sum(c.size for c in entry.chunks)
        if declared != entry.size:
            raise IntegrityError(f"{entry.path}: chunk sizes add up to {declared}, manifest says {entry.size}")
        digest = hashlib.sha256()
        written = 0
        try:
            with open(dest, "wb") as out:
                for ref in entry.chunks:
                    data = self.get(ref.sha256)
                    if len(data) != ref.size or sha256_bytes(data) != ref.sha256:
                        self.path(ref.sha256).unlink(missing_ok=True)
                        error = IntegrityError(f"{entry.path}: stored chunk {ref.sha256[:12]}… is corrupt; removed")
                        error.kind = ErrorKind.CORRUPT_CHUNK  # type: ignore[attr-defined]  # local damage: fetch again
                        raise error
                    out.write(data)
                    digest.update(data)
                    written += len(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise storage_error(f"assembling {entry.path}", exc) from None
        if written != entry.size or digest.hexdigest() != entry.sha256:
            raise IntegrityError(f"{entry.path}: assembled file does not match the manifest's sha256")

    def shas(self) -> set[str]:
        return {p.name for p in self.root.glob("*/*") if _hex_ok(p.name)}

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*") if _hex_ok(p.name))

    def retain_only(self, keep: set[str]) -> int:
        """Delete every chunk not in ``keep``; returns how many were deleted."""
        removed = 0
        for sha in self.shas() - keep:
            self.path(sha).unlink(missing_ok=True)
            removed += 1
        return removed
