"""Re-assemble the damaged files of a release folder from the device's own chunk store.

A release folder is a cache of chunks its manifest pins by sha256, and the device keeps the
chunks of its active and previous releases, so a file that no longer matches (bit rot, a torn
write, a stray ``dd``) is rebuilt locally in the time it takes to copy it: no broker, no store.
Whatever cannot be rebuilt is named (:attr:`RepairReport.missing`) for the caller to re-fetch.

The manifest is checked against its release statement first (when a trust root is given), so a
manifest edited on disk cannot steer the repair; the caller loads and self-tests the release
again afterwards, as for any release.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_sdk.chunking import sha256_bytes
from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, ChunkRef, resolve_inside, verify_file, verify_manifest_bytes
from edge_sdk.trust import TrustRoot

from .chunk_store import ChunkStore, storage_error
from .releases import fsync_dir

_REPAIR_SUFFIX = ".repair"


@dataclass
class RepairReport:
    repaired: list[str] = field(default_factory=list)  # files rewritten from local chunks
    missing: list[ChunkRef] = field(default_factory=list)  # chunks a damaged file needs that are not local
    unrepaired: list[str] = field(default_factory=list)  # damaged files left as they are (chunks missing)

    @property
    def complete(self) -> bool:
        return not self.unrepaired


def repair_release(release_dir: Path, chunks: ChunkStore, trust: TrustRoot | None = None) -> RepairReport:
    """Rebuild every listed file of ``release_dir`` that is damaged (or gone while its chunks are
    still kept) from ``chunks``; see the module docstring. Raises :class:`IntegrityError` if the
    manifest itself is unreadable or does not match its statement (then only a re-fetch helps)."""
    data = (release_dir / MANIFEST_NAME).read_bytes()
    sig_path = release_dir / SIGNATURE_NAME
    manifest = verify_manifest_bytes(data, sig_path.read_bytes() if sig_path.exists() else None, trust)
    report = RepairReport()
    missing: dict[str, ChunkRef] = {}
    for entry in manifest.files(manifest.variants):
        path = resolve_inside(release_dir, entry.path)
        if path.exists():
            try:
                verify_file(release_dir, entry)
                continue
            except IntegrityError:
                pass
        elif chunks.missing(entry.chunks):
            continue  # never staged here (another profile's variant)
        lacking = _unusable(chunks, entry.chunks)
        if lacking:
            report.unrepaired.append(entry.path)
            missing.update((ref.sha256, ref) for ref in lacking)
            continue
        tmp = path.with_name(path.name + _REPAIR_SUFFIX)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            chunks.assemble(entry, tmp)  # verifies each chunk and the whole file
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except IntegrityError:  # a stored chunk was bad too (assemble removed it): re-fetch
            tmp.unlink(missing_ok=True)
            report.unrepaired.append(entry.path)
            missing.update((ref.sha256, ref) for ref in chunks.missing(entry.chunks))
            continue
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(f"repairing {entry.path}", exc) from None
        report.repaired.append(entry.path)
    report.missing = list(missing.values())
    return report


def _unusable(chunks: ChunkStore, refs: list[ChunkRef]) -> list[ChunkRef]:
    """Those of ``refs`` not stored intact; a stored chunk gone bad is removed (so it is re-fetched)."""
    out = []
    for ref in refs:
        path = chunks.path(ref.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            out.append(ref)
            continue
        if len(data) != ref.size or sha256_bytes(data) != ref.sha256:
            path.unlink(missing_ok=True)
            out.append(ref)
    return out
