"""Release folders on the device: staging, atomic activation, rollback, retention, replay protection.

Layout under ``root`` (a device serves several models; each has its own pointers)::

    releases/<model>@v<version>/   complete, verified release folders (manifest.json [+ .sig] + files)
    staging/                       folders being assembled; emptied when the store is opened
    current/<model>  -> ../releases/…   symlink: the model's active release
    previous/<model> -> ../releases/…   symlink: what it pointed to before the model's last activation
    state.json                     highest version ever accepted per model (rollback protection;
                                   only ``previous/<model>`` may be older, see ``check_version``)

Every step is crash-safe. A release is assembled in ``staging/``, fsynced, and renamed into
``releases/`` (then the folder is fsynced). Activation writes a new symlink beside
``current/<model>`` and renames it over it (atomic on POSIX), then fsyncs the folder: after a
``kill -9`` at any moment ``current/<model>`` names either the old or the new complete release,
never a half one. One model's activation, rollback or cleanup never touches another model's
pointers or releases. The single-model layout of earlier versions (``current``/``previous``
symlinks in ``root``) is moved to this one when the store is opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, resolve_inside, verify_file

from .chunk_store import ChunkStore, storage_error

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(?P<model>.+)@v(?P<version>\d+)$")
_POINTERS = ("current", "previous")  # folders of per-model symlinks


def release_name(model: str, version: int) -> str:
    return f"{model}@v{version}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ReleaseStore:
    """The releases on one device. See the module docstring for the layout and guarantees."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._state_lock = threading.Lock()  # models activate from their own threads
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
        with self._state_lock:
            state = self._state()
            if version > int(state["highest"].get(model, 0)):
                state["highest"][model] = version
                write_atomic(self._state_path, json.dumps(state, sort_keys=True).encode())

    def check_version(self, model: str, version: int) -> None:
        """Rollback protection: refuse a release older than the highest ever accepted — except the
        model's ``previous`` release, which this device activated before and still holds: going
        back to it is a rollback the fleet asked for (a halted rollout sets desired state back to
        it), not a replay of one it moved past. Only that one step back; older ones stay refused."""
        highest = self.highest_accepted(model)
        previous = self.previous(model)
        if version < highest and (previous is None or parse_name(previous.name) != (model, version)):
            raise IntegrityError(
                f"release {model} v{version} is older than v{highest}, the highest this device accepted (replay refused)"
            )

    def _recover(self) -> None:
        # Staging folders and half-written links are what a crash leaves behind; none is in use.
        for leftover in self.staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for link in self.root.glob(".*.link"):  # of the single-model layout
            link.unlink(missing_ok=True)
        self._migrate_single_model_layout()
        for kind in _POINTERS:
            (self.root / kind).mkdir(exist_ok=True)
            for link in (self.root / kind).glob(".*.link"):
                link.unlink(missing_ok=True)
        # A crash between switching `current/<model>` and recording the version: the switch wins.
        for model in self.models():
            ref = self.active_ref(model)
            if ref is not None:
                self._record_accepted(*ref)

    def _migrate_single_model_layout(self) -> None:
        """``root/current`` and ``root/previous`` symlinks (one model) → ``current/<model>``, ``previous/<model>``.

        The old link is first renamed aside (freeing its name for the folder), then re-created in
        the folder; a crash between the steps is finished by the next open."""
        for kind in _POINTERS:
            legacy, moving = self.root / kind, self.root / f".{kind}.migrating"
            if legacy.is_symlink():
                moving.unlink(missing_ok=True)
                os.rename(legacy, moving)
                fsync_dir(self.root)
            if moving.is_symlink():
                target = (self.root / os.readlink(moving)).resolve()
                ref = parse_name(target.name)
                (self.root / kind).mkdir(exist_ok=True)
                if ref is not None and target.is_dir():
                    self._point(kind, ref[0], target)
                    fsync_dir(self.root / kind)
                moving.unlink()
                fsync_dir(self.root)

    # -- queries -----------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Models with an active release, sorted."""
        folder = self.root / "current"
        return sorted(p.name for p in folder.iterdir() if p.is_symlink() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def _model(self, model: str | None) -> str | None:
        """``model``, or the device's only model when None (None if it has none)."""
        if model is not None:
            return model
        models = self.models()
        if len(models) > 1:
            raise SyncError(f"this device serves several models ({', '.join(models)}): name one")
        return models[0] if models else None

    def _pointer(self, kind: str, model: str | None) -> Path | None:
        model = self._model(model)
        if model is None:
            return None
        link = self.root / kind / model
        if not link.is_symlink():
            return None
        target = (link.parent / os.readlink(link)).resolve()
        return target if target.is_dir() else None

    def active(self, model: str | None = None) -> Path | None:
        """The active release folder of ``model`` (default: the only model), or None before its first activation."""
        return self._pointer("current", model)

    def previous(self, model: str | None = None) -> Path | None:
        return self._pointer("previous", model)

    def active_ref(self, model: str | None = None) -> tuple[str, int] | None:
        active = self.active(model)
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
    def _point(self, kind: str, model: str, target: Path | None) -> None:
        folder = self.root / kind
        link = folder / model
        if target is None:
            link.unlink(missing_ok=True)
            return
        tmp = folder / f".{model}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, folder), tmp)
        os.replace(tmp, link)

    def activate(self, folder: Path) -> Path | None:
        """Make ``folder`` its model's active release atomically; returns the release it replaced."""
        ref = parse_name(folder.name)
        if ref is None or folder.parent.resolve() != self.releases.resolve():
            raise SyncError(f"{folder} is not a release folder of this store")
        model = ref[0]
        old = self.active(model)
        if old is not None and old.resolve() == folder.resolve():
            return self.previous(model)
        try:
            self._point("previous", model, old)  # written first: a crash here leaves `current` as it was
            fsync_dir(self.root / "previous")
            self._point("current", model, folder)
            fsync_dir(self.root / "current")
            self._record_accepted(*ref)
        except OSError as exc:
            raise storage_error(f"activating {folder.name}", exc) from None
        return old

    def rollback(self, model: str | None = None) -> Path | None:
        """Point ``model``'s ``current`` back at its ``previous``; returns the release now active (None if none)."""
        model = self._model(model)
        if model is None:
            return None
        prev, bad = self.previous(model), self.active(model)
        self._point("current", model, prev)
        fsync_dir(self.root / "current")
        self._point("previous", model, None)
        fsync_dir(self.root / "previous")
        if bad is not None and bad != prev:
            self._remove(bad)
        return prev

    def discard(self, folder: Path) -> None:
        """Remove a staged release that will not be activated (failed self-test)."""
        ref = parse_name(folder.name)
        if ref is None or folder not in (self.active(ref[0]), self.previous(ref[0])):
            self._remove(folder)

    def cleanup(self, model: str | None = None) -> list[str]:
        """Delete ``model``'s releases except its active and previous ones; returns the names removed.
        Other models' releases are not touched."""
        model = self._model(model)
        if model is None:
            return []
        keep = {p.resolve() for p in (self.active(model), self.previous(model)) if p is not None}
        removed = []
        for folder in self.releases.iterdir():
            ref = parse_name(folder.name)
            if ref is not None and ref[0] == model and folder.resolve() not in keep:
                self._remove(folder)
                removed.append(folder.name)
        return removed

    def kept_chunks(self) -> set[str]:
        """sha256 of every chunk of every file held by every model's active and previous releases."""
        shas: set[str] = set()
        folders = [f for model in self.models() for f in (self.active(model), self.previous(model))]
        for folder in folders:
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
