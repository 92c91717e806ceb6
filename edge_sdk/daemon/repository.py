"""What the API can address: each configured model, by release version, and the repository calls.

A model's versions are the releases present on the device (what sync keeps — the active and the
previous one — and the configured ``release``: one release folder, or a folder of them), found
through ``releases(name)``. The active version
is the one the :class:`~.models.ModelTable` serves; another present version is loaded on the first
inference that names it and kept (at most ``max_inactive`` per model, least recently used first
out). ``unload`` stops serving a model until ``load`` (or a newly synced release) brings it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeSDKError
from ..manifest import MANIFEST_NAME, Manifest, load_manifest
from .kserve import ApiError, Status
from .models import ModelTable, ServedModel

log = logging.getLogger(__name__)

UNLOADED = "unloaded through the repository API (POST /v2/repository/models/{name}/load serves it again)"


def release_folders(path: Path) -> list[Path]:
    """``path`` if it is a release folder; if it is a folder of release folders (a local model
    repository, as Triton's ``<model>/<version>/``), those, newest release version first."""
    if (path / MANIFEST_NAME).exists() or not path.is_dir():
        return [path]
    found = []
    for sub in path.iterdir():
        try:
            found.append((int(json.loads((sub / MANIFEST_NAME).read_bytes())["version"]), sub))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a release: the loader says why when it is the only candidate
    return [folder for _, folder in sorted(found, reverse=True)] or [path]


@dataclass(frozen=True)
class LocalRelease:
    version: int
    release_dir: Path
    manifest: Manifest


@dataclass(frozen=True)
class VersionView:
    """One addressable version: its release, and the loaded model when it is loaded."""

    name: str
    release: LocalRelease | None
    served: ServedModel | None

    @property
    def version(self) -> int:
        return self.served.version if self.served is not None else self.release.version

    @property
    def manifest(self) -> Manifest:
        return self.served.manifest if self.served is not None else self.release.manifest


class Repository:
    def __init__(self, models: ModelTable, configured: Callable[[], list[str]], releases: Callable[[str], list[Path]],
                 load_version: Callable[[str, Path], ServedModel], load_model: Callable[[str], bool],
                 max_inactive: int = 1) -> None:
        self.models = models
        self._configured, self._releases = configured, releases
        self._load_version, self._load_model = load_version, load_model
        self.max_inactive = max_inactive
        self._manifests: dict[tuple[Path, int], Manifest] = {}
        self._inactive: OrderedDict[tuple[str, int], ServedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Future] = {}
        self._lock = threading.Lock()

    # ---- what is present -----------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(set(self._configured()) | set(self.models.names()))

    def has(self, name: str) -> bool:
        return name in self._configured() or self.models.get(name) is not None or self.models.error(name) is not None

    def releases(self, name: str) -> dict[int, LocalRelease]:
        """Version → release present on disk, best candidate first when two hold one version."""
        found: dict[int, LocalRelease] = {}
        for folder in self._releases(name):
            manifest = self._manifest(folder)
            if manifest is not None and manifest.version not in found:
                found[manifest.version] = LocalRelease(manifest.version, folder, manifest)
        return found

    def _manifest(self, folder: Path) -> Manifest | None:
        try:
            key = (folder.resolve(), (folder / "manifest.json").stat().st_mtime_ns)
        except OSError:
            return None
        manifest = self._manifests.get(key)
        if manifest is None:
            try:
                manifest = load_manifest(folder)
            except Exception as exc:  # a corrupt folder is not addressable; the log says why
                log.warning("model release %s is not addressable: %s", folder, exc)
                return None
            self._manifests[key] = manifest
        return manifest

    def versions(self, name: str) -> list[int]:
        versions = set(self.releases(name))
        served = self.models.get(name)
        if served is not None:
            versions.add(served.version)
        return sorted(versions)

    def _unknown(self, name: str) -> ApiError:
        return ApiError(Status.NOT_FOUND, f"unknown model {name!r}; served: {self.names()}")

    def _parse_version(self, name: str, version: str | None) -> int | None:
        if version in (None, ""):
            return None
        try:
            return int(version)
        except ValueError:
            raise ApiError(Status.NOT_FOUND, f"model {name!r} has no version {version!r}: versions are release "
                                             f"numbers, present: {self.versions(name)}") from None

    def view(self, name: str, version: str | None) -> VersionView:
        """The version to describe (metadata, config, ready); raises NOT_FOUND/UNAVAILABLE."""
        if not self.has(name):
            raise self._unknown(name)
        wanted = self._parse_version(name, version)
        active = self.models.get(name)
        if wanted is None or (active is not None and active.version == wanted):
            if active is None:
                raise ApiError(Status.UNAVAILABLE, f"model {name!r} is not loaded: {self.models.error(name) or 'loading'}")
            return VersionView(name, None, active)
        release = self.releases(name).get(wanted)
        if release is None:
            raise ApiError(Status.NOT_FOUND, f"model {name!r} has no version {wanted} on this device; "
                                             f"present: {self.versions(name)}")
        with self._lock:
            served = self._inactive.get((name, wanted))
        return VersionView(name, release, served)

    def ready(self, name: str, version: str | None) -> bool:
        try:
            return self.view(name, version).served is not None
        except ApiError as exc:
            if exc.status is Status.UNAVAILABLE:
                return False
            raise

    # ---- serving -------------------------------------------------------------------------------

    async def checkout(self, name: str, version: str | None) -> ServedModel:
        """The model to run, with a use taken on it (``release()`` it after)."""
        if not self.has(name):
            raise self._unknown(name)
        wanted = self._parse_version(name, version)
        served = self.models.checkout(name)
        if served is not None and (wanted is None or served.version == wanted):
            return served
        if served is not None:
            served.release()
        if wanted is None or self.models.error(name) == UNLOADED.format(name=name):
            raise ApiError(Status.UNAVAILABLE, f"model {name!r} is not loaded: {self.models.error(name) or 'loading'}")
        key = (name, wanted)
        with self._lock:
            loaded = self._inactive.get(key)
            if loaded is not None:
                self._inactive.move_to_end(key)
                return loaded.acquire()
        return await self._load_inactive(key)

    async def _load_inactive(self, key: tuple[str, int]) -> ServedModel:
        name, version = key
        release = self.releases(name).get(version)
        if release is None:
            raise ApiError(Status.NOT_FOUND, f"model {name!r} has no version {version} on this device; "
                                             f"present: {self.versions(name)}")
        if self.max_inactive == 0:
            raise ApiError(Status.UNAVAILABLE, f"model {name!r} version {version} is present but not loaded, and "
                                               "api.max_inactive_versions is 0")
        pending = self._loading.get(key)
        if pending is None:  # one load per version, however many calls wait for it
            pending = asyncio.ensure_future(asyncio.to_thread(self._load_version, name, release.release_dir))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        try:
            served = await asyncio.shield(pending)
        except EdgeSDKError as exc:
            raise ApiError(Status.UNAVAILABLE, f"model {name!r} version {version} does not load: {exc}") from None
        except Exception as exc:
            log.exception("model %s v%s: unexpected load error", name, version)
            raise ApiError(Status.INTERNAL, f"model {name!r} version {version} does not load: {type(exc).__name__}") from None
        evicted = []
        with self._lock:
            current = self._inactive.setdefault(key, served)
            self._inactive.move_to_end(key)
            mine = [k for k in self._inactive if k[0] == name]
            while len(mine) > self.max_inactive:
                evicted.append(self._inactive.pop(mine.pop(0)))
            result = current.acquire()
        if current is not served:
            served.retire()
        for old in evicted:
            log.info("model %s: version %s unloaded (least recently used)", name, old.version)
            old.retire()
        if current is served:
            log.info("model %s: version %s loaded on demand from %s", name, version, release.release_dir)
        return result

    # ---- repository extension ------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        rows = []
        for name in self.names():
            active = self.models.get(name)
            with self._lock:
                inactive = {v for (n, v) in self._inactive if n == name}
            versions = self.versions(name)
            if not versions:
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE",
                             "reason": self.models.error(name) or "no release on this device yet"})
            for version in versions:
                if (active is not None and active.version == version) or version in inactive:
                    rows.append({"name": name, "version": str(version), "state": "READY", "reason": ""})
                else:
                    reason = (self.models.error(name) if active is None else None) or \
                        "not loaded: loads on the first inference for this version"
                    rows.append({"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": reason})
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    async def load(self, name: str) -> None:
        if name not in self._configured():
            raise ApiError(Status.NOT_FOUND, f"cannot load {name!r}: not a configured model ({self._configured()})")
        if not await asyncio.to_thread(self._load_model, name):
            raise ApiError(Status.UNAVAILABLE, f"model {name!r} did not load: {self.models.error(name) or 'unknown error'}")

    def unload(self, name: str) -> None:
        if not self.has(name):
            raise self._unknown(name)
        self.models.remove(name)
        self.models.set_error(name, UNLOADED.format(name=name))
        with self._lock:
            evicted = [self._inactive.pop(k) for k in [k for k in self._inactive if k[0] == name]]
        for served in evicted:
            served.retire()
        log.info("model %s: unloaded through the repository API", name)

    def close(self) -> None:
        with self._lock:
            evicted, self._inactive = list(self._inactive.values()), OrderedDict()
        for served in evicted:
            served.retire()
