"""Release folders on the device: staging, atomic activation, rollback, retention, replay protection.

Layout under ``root``::

    releases/<model>@v<version>/   complete, verified release folders (manifest.json [+ .sig] + files)
    staging/                       folders being assembled; emptied when the store is opened
    current  -> releases/…         symlink: the active release
    previous -> releases/…         symlink: what ``current`` pointed to before the last activation
    state.json                     highest version ever accepted per model (rollback protection)

Every step is crash-safe. A release is assembled in ``staging/``, fsynced, and renamed into
``releases/`` (then the folder is fsynced). Activation writes a new symlink beside ``current``
and renames it over ``current`` (atomic on POSIX), then fsyncs ``root``: after a ``kill -9`` at any
moment ``current`` names either the old or the new complete release, never a half one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, resolve_inside, verify_file

from .chunk_store import ChunkStore, storage_error

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(?P<model>.+)@v(?P<version>\d+)$")


def release_name(model: str, version: int) -> str:
    return f"{model}@v{version}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class ReleaseStore:
    """The releases on one device. See the module docstring for the layout and guarantees."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.releases = self.root / "releases"
        self.staging = self.root / "staging"
        for folder in (self.releases, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- state -------------------------------------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.root / "state.json"

    def _state(self) -> dict:
        try:
            state = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {"highest": {}}
            if not isinstance(state, dict) or not isinstance(state.setdefault("highest", {}), dict):
                raise ValueError("not an object with a 'highest' map")
        except (ValueError, OSError) as exc:
            # Real damage (the file is only ever replaced atomically). Sync must go on, and rollback
            # protection must not reset to zero: keep the file for inspection and rebuild the state
            # from the release folders on disk, the versions this device did accept.
            return self._rebuild_state(exc)
        return state

    def _rebuild_state(self, exc: Exception) -> dict:
        aside = self._state_path.with_name(f"state.json.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self._state_path, aside)
        highest: dict[str, int] = {}
        for folder in self.releases.iterdir():
            ref = parse_name(folder.name)
            if ref is not None:
                highest[ref[0]] = max(ref[1], highest.get(ref[0], 0))
        state = {"highest": highest, "rebuilt": {"from": str(aside), "reason": str(exc)}}
        log.error("%s is corrupt (%s): moved to %s, rollback protection rebuilt from the releases on disk: %s",
                  self._state_path, exc, aside, highest)
        write_atomic(self._state_path, json.dumps(state, sort_keys=True).encode())
        return state

    def highest_accepted(self, model: str) -> int:
        """The highest version of ``model`` this device ever activated (0 if none)."""
        return int(self._state()["highest"].get(model, 0))

    def _record_accepted(self, model: str, version: int) -> None:
        state = self._state()
        if version > int(state["highest"].get(model, 0)):
            state["highest"][model] = version
            write_atomic(self._state_path, json.dumps(state, sort_keys=True).encode())

    def check_version(self, model: str, version: int) -> None:
        """Rollback protection: refuse a release older than the highest ever accepted."""
        highest = self.highest_accepted(model)
        if version < highest:
            raise IntegrityError(
                f"release {model} v{version} is older than v{highest}, the highest this device accepted (replay refused)"
            )

    def _recover(self) -> None:
        # Staging folders and half-written links are what a crash leaves behind; none is in use.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for link in self.root.glob(".*.link"):
            link.unlink(missing_ok=True)
        # A crash between switching `current` and recording the version: the switch wins.
        active = self.active_ref()
        if active is not None:
            self._record_accepted(*active)

    # -- queries -----------------------------------------------------------------------------
    def _pointer(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = (self.root / os.readlink(link)).resolve()
        return target if target.is_dir() else None

    def active(self) -> Path | None:
        """The active release folder, or None before the first activation."""
        return self._pointer("current")

    def previous(self) -> Path | None:
        return self._pointer("previous")

    def active_ref(self) -> tuple[str, int] | None:
        active = self.active()
        return parse_name(active.name) if active else None

    def path_of(self, model: str, version: int) -> Path:
        return self.releases / release_name(model, version)

    def verify(self, folder: Path) -> Manifest:
        """Check every file the folder's manifest lists *and holds* plus the self-test files.

        A device keeps only its own variants' files, so files of other variants may be absent;
        but every present listed file must match, and at least one variant must be complete.
        """
        manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes(), str(folder))
        complete = 0
        for variant in manifest.variants:
            present = [e for e in variant.files if resolve_inside(folder, e.path).exists()]
            for entry in present:
                verify_file(folder, entry)
            complete += bool(present) and len(present) == len(variant.files)
        if manifest.self_test is not None:
            verify_file(folder, manifest.self_test.inputs)
            verify_file(folder, manifest.self_test.expected)
        if not complete:
            raise IntegrityError(f"{folder}: holds no complete variant")
        return manifest

    # -- staging -----------------------------------------------------------------------------
    def stage(self, manifest: Manifest, manifest_bytes: bytes, signature: bytes | None,
              files: list[FileEntry], chunks: ChunkStore) -> Path:
        """Assemble ``files`` from ``chunks`` into a complete release folder; return its path.

        If that release folder already exists (a crash after staging), it is reused when it
        verifies and rebuilt otherwise. Nothing here touches ``current``.
        """
        final = self.path_of(manifest.model, manifest.version)
        if final.is_dir():
            try:
                self.verify(final)
                if all(resolve_inside(final, e.path).is_file() for e in files):
                    return final
            except (IntegrityError, OSError):
                pass
            self._remove(final)
        stage = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=self.staging))
        try:
            for entry in files:
                dest = resolve_inside(stage, entry.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                chunks.assemble(entry, dest)
            (stage / MANIFEST_NAME).write_bytes(manifest_bytes)
            if signature:
                (stage / SIGNATURE_NAME).write_bytes(signature)
            _fsync_tree(stage)
            os.rename(stage, final)
            fsync_dir(self.releases)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise storage_error(f"staging {final.name}", exc) from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return final

    # -- activation --------------------------------------------------------------------------
    def _point(self, name: str, target: Path | None) -> None:
        link = self.root / name
        if target is None:
            link.unlink(missing_ok=True)
            return
        tmp = self.root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, link)

    def activate(self, folder: Path) -> Path | None:
        """Make ``folder`` the active release atomically; returns the release it replaced."""
        ref = parse_name(folder.name)
        if ref is None or folder.parent.resolve() != self.releases.resolve():
            raise SyncError(f"{folder} is not a release folder of this store")
        old = self.active()
        if old is not None and old.resolve() == folder.resolve():
            return self.previous()
        try:
            self._point("previous", old)  # written first: a crash here leaves `current` as it was
            self._point("current", folder)
            fsync_dir(self.root)
            self._record_accepted(*ref)
        except OSError as exc:
            raise storage_error(f"activating {folder.name}", exc) from None
        return old

    def rollback(self) -> Path | None:
        """Point ``current`` back at ``previous``; returns the release now active (None if none)."""
        prev = self.previous()
        bad = self.active()
        if prev is None:
            self._point("current", None)
        else:
            self._point("current", prev)
        self._point("previous", None)
        fsync_dir(self.root)
        if bad is not None and bad != prev:
            self._remove(bad)
        return prev

    def discard(self, folder: Path) -> None:
        """Remove a staged release that will not be activated (failed self-test)."""
        if folder not in (self.active(), self.previous()):
            self._remove(folder)

    def cleanup(self) -> list[str]:
        """Delete every release except the active and previous ones; returns the names removed."""
        keep = {p.resolve() for p in (self.active(), self.previous()) if p is not None}
        removed = []
        for folder in self.releases.iterdir():
            if folder.resolve() not in keep:
                self._remove(folder)
                removed.append(folder.name)
        return removed

    def kept_chunks(self) -> set[str]:
        """sha256 of every chunk of every file held by the active and previous releases."""
        shas: set[str] = set()
        for folder in (self.active(), self.previous()):
            if folder is None:
                continue
            manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes(), str(folder))
            for entry in manifest.files(manifest.variants):
                if resolve_inside(folder, entry.path).exists():
                    shas.update(c.sha256 for c in entry.chunks)
        return shas

    def _remove(self, folder: Path) -> None:
        # Rename first so a crash mid-delete never leaves a half folder under a release name.
        trash = self.staging / f"{folder.name}.trash"
        try:
            os.rename(folder, trash)
        except OSError:
            trash = folder
        shutil.rmtree(trash, ignore_errors=True)


def parse_name(name: str) -> tuple[str, int] | None:
    match = _NAME.match(name)
    return (match["model"], int(match["version"])) if match else None


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_dir():
            fsync_dir(path)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)
