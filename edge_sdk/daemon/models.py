"""The models a daemon serves: load a release into an ``EdgeModel``, swap atomically, count calls.

A swap never interrupts a call: callers take a reference to the current :class:`ServedModel`
and finish on it; the old one is closed once nobody uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import numpy as np

from ..errors import EdgeSDKError, ModelError
from ..manifest import Manifest, TensorSpec, load_manifest
from ..profiles import resolve_profile
from ..runtime.model import EdgeModel, ModelInfo
from ..trust import TrustRoot
from ..runtime.monitor import ResourceSource, SystemSource
from .config import ModelConfig, PolicyConfig

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One loaded release of one configured model."""

    name: str
    release_dir: Path
    manifest: Manifest
    model: EdgeModel
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    loaded_at: float = field(default_factory=time.time)
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _labels: dict[Any, tuple[str, str]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.manifest.version

    def info(self) -> ModelInfo | None:
        """What runs now (backend, precision, variant); None once the model is closed or broken."""
        try:
            return self.model.info()
        except Exception as exc:  # info must never break metadata/health calls
            log.warning("model %s: info() failed: %s", self.name, exc)
            return None

    def backend_precision(self) -> tuple[str, str]:
        info = self.info()
        if info is None:
            return "unknown", "unknown"
        return info.backend, info.precision.value

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.model.run(inputs)

    def labels(self) -> tuple[str, str]:
        """(backend, precision) of what runs now for a call's metrics: one info() per precision the
        model runs at (a precision is one variant of the release), not one per call."""
        try:
            precision = self.model.precision
        except Exception:  # closed or broken: as backend_precision() says
            return "unknown", "unknown"
        found = self._labels.get(precision)
        if found is None:
            found = self._labels[precision] = self.backend_precision()
        return found

    def acquire(self) -> ServedModel:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        """Close now if idle, else when the last caller releases it."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        try:
            self.model.close()
        except Exception as exc:  # closing an old model must not take the daemon down
            log.warning("model %s v%s: close failed: %s", self.name, self.version, exc)


def load_served(config: ModelConfig, release_dir: Path, *, public_key: TrustRoot | Path | None = None,
                policy: PolicyConfig | None = None, resources: ResourceSource | None = None) -> ServedModel:
    """Load ``release_dir`` for ``config`` (hashes, signature and self-test are checked by EdgeModel.load).

    ``policy``: whether and how the precision policy switches on resource pressure, deciding on
    figures read from ``resources`` (default: this machine, or ``policy.resource_root``).
    """
    release_dir = Path(release_dir)
    try:
        manifest = load_manifest(release_dir)
    except EdgeSDKError:
        raise
    except Exception as exc:  # translate anything odd in a corrupt folder
        raise ModelError(f"{release_dir}: cannot read the release manifest: {exc}") from None
    policy = policy or PolicyConfig()
    profile = resolve_profile(config.profile)
    monitor: ResourceSource | bool = False
    settings = None
    if policy.enabled:
        monitor = resources if resources is not None else SystemSource(policy.resource_root or "/")
        if policy.min_dwell_s is not None:
            settings = profile.profile.policy.model_copy(update={"min_dwell_s": policy.min_dwell_s})
    started = time.perf_counter()
    model = EdgeModel.load(release_dir, profile=profile, precision=config.precision, backend=config.backend,
                           public_key=public_key, monitor=monitor, interval_s=policy.interval_s, policy=settings,
                           device_checks=policy.device_checks)
    info = model.info()
    log.info("model %s: loaded v%s from %s (%s, %s) in %.0f ms", config.name, manifest.version, release_dir,
             info.backend, info.precision, (time.perf_counter() - started) * 1000)
    ok = [v for v in manifest.variants if v.ok] or manifest.variants
    if not ok:
        model.close()
        raise ModelError(f"{release_dir}: the release has no variants")
    # Every variant carries the caller's signature (original names and layout), so any one will do.
    return ServedModel(config.name, release_dir, manifest, model, list(ok[0].inputs), list(ok[0].outputs))


class ModelTable:
    """Name → currently served model; thread-safe lookups and swaps."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = False

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._models) | set(self._errors))

    def get(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    def error(self, name: str) -> str | None:
        with self._lock:
            return self._errors.get(name)

    def checkout(self, name: str) -> ServedModel | None:
        """The current model with a use taken on it (call :meth:`ServedModel.release` after)."""
        with self._lock:
            served = self._models.get(name)
            return served.acquire() if served is not None else None

    def put(self, served: ServedModel) -> bool:
        """Make ``served`` the active model of its name; the previous one is retired.

        False (and ``served`` closed) once the table is closed: a swap that finishes during
        shutdown must not leave a model open after :meth:`close`.
        """
        with self._lock:
            refused = self._closed
            old = None if refused else self._models.get(served.name)
            if not refused:
                self._models[served.name] = served
                self._errors.pop(served.name, None)
        if refused:
            served.retire()
            return False
        if old is not None and old is not served:
            old.retire()
        return True

    def set_error(self, name: str, message: str) -> None:
        with self._lock:
            self._errors[name] = message

    def remove(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
            self._errors.pop(name, None)
        if old is not None:
            old.retire()

    def all(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    def close(self) -> None:
        """Retire every model and refuse later :meth:`put` calls."""
        with self._lock:
            self._closed = True
        for name in self.names():
            self.remove(name)
