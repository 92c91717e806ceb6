"""The daemon's side of fleet sync: ``SyncClient`` + durable outbox + telemetry uploader.

Offline-first: nothing here blocks start-up. The MQTT transport connects in the background;
while the broker is away the daemon serves the last active release from disk and telemetry
records pile up in the SQLite outbox, to be uploaded (and deleted on ingest acks) later.

The bridge knows the daemon only through narrow collaborators (as Eclipse Kura's services know
each other through listeners): the config, the :class:`~.models.ModelTable` it reads, and an
``on_release(served)`` hook that serves a release the bridge loaded. A synced release is loaded
once: its self-test *is* the daemon's load (:func:`~.models.load_served` checks hashes,
signature and self-test), and the loaded model is what ``on_release`` serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..errors import EdgeSDKError, OutboxFullError
from ..profiles import AUTO, resolve_profile
from ..runtime.monitor import ResourceSource
from ..runtime.policy import PolicyEvent, PolicyOverride
from ..manifest import ChunkRef
from ..runtime.sync.client import Selection, SyncClient, SyncConfig
from ..runtime.sync.fetch import fetch_missing
from ..runtime.sync.outbox import Outbox, OutboxConfig, Priority
from ..runtime.sync.releases import parse_name
from ..runtime.sync.repair import RepairReport, repair_release
from ..runtime.sync.telemetry import TelemetryUploader
from ..trust import TrustStore
from ..types import ErrorKind, MemoryMode, RecordKind
from .config import DaemonConfig, ModelConfig
from .metrics import Snapshot
from .models import ModelTable, ServedModel, load_served

log = logging.getLogger(__name__)

#: Serve ``served`` (loaded and self-tested from a synced release); False if it was not taken,
#: which makes sync roll the release back.
ReleaseHook = Callable[[ServedModel], bool]


class SyncBridge:
    """Owns the SyncClient, the outbox and the uploader of one daemon.

    ``resources`` is the reader behind the twin's and the telemetry's resource figures (the one
    the daemon's precision policy and ``/metrics`` use).
    """

    def __init__(self, config: DaemonConfig, models: ModelTable, on_release: ReleaseHook,
                 resources: ResourceSource | None = None, trust: TrustStore | None = None) -> None:
        self.config = config
        self.models = models
        self.on_release = on_release
        self.resources = resources
        sync = config.sync
        profiles = {m.profile for m in config.models}
        profile = resolve_profile(profiles.pop()).profile.id if len(profiles) == 1 else None
        self.root = config.state_dir / "sync"
        self.client = SyncClient(
            SyncConfig(broker=sync.broker, fleet=sync.fleet, device=config.device_id, root=self.root, profile=profile,
                       labels=sync.labels, public_key=sync.public_key, allow_unsigned=sync.allow_unsigned,
                       prefix=sync.topic_prefix or "", tls=sync.tls),
            self_test=self._load, on_activate=self._on_activate, on_policy=self._on_policy, resources=resources,
            trust=trust,
        )
        self.outbox = Outbox(OutboxConfig(path=config.state_dir / "outbox.db", max_bytes=config.outbox.max_bytes,
                                          on_full=config.outbox.policy))
        self.uploader = TelemetryUploader(self.outbox, self.client.transport, self.client.topics, config.device_id,
                                          twin=self.client.twin)
        self.interval_s = sync.telemetry_interval_s
        self._calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # count, sum s, max s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Self-tested, waiting for the switch on disk; per model: several models sync at once.
        self._loaded: dict[str, ServedModel] = {}
        self._loaded_lock = threading.Lock()
        self._profile = profile
        self.records_queued = 0
        self.records_lost = 0
        self.last_success: float | None = None  # wall time of the last release activation
        self.policy: PolicyOverride | None = None  # the desired runtime policy last received
        self._results: list[dict[str, Any]] = []
        self._refetching: set[Path] = set()  # damaged releases whose chunks are being fetched again
        #: How long a clean SyncClient.stop() may take at shutdown before the link is cut.
        self.link_stop_s = 3.0

    def reconfigure(self, config: DaemonConfig) -> None:
        """A reloaded config (models, policy): used for the next synced release."""
        self.config = config

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.uploader.start()
        self.client.start()  # returns at once: connects (and reconnects) in the background
        self._thread = threading.Thread(target=self._telemetry_loop, name="telemetry-stats", daemon=True)
        self._thread.start()

    def stop(self, deadline: float, upload_grace_s: float = 3.0) -> None:
        """Stop the threads by ``deadline`` (``time.monotonic()``); the outbox is on disk already
        (every append is committed).

        When connected, the uploader gets up to ``upload_grace_s`` (within the deadline) to have
        the last records acked by ingest; whatever is left stays in the outbox for the next start.
        """

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop.set()
        if self._thread is not None:
            self._thread.join(remaining())
        self._flush_stats()
        # At most half of what is left: the link still has to be stopped below.
        upload_until = time.monotonic() + min(upload_grace_s, remaining() / 2)
        while self.client.transport.connected and time.monotonic() < upload_until:
            try:
                if self.outbox.stats().rows == 0:
                    break
            except EdgeSDKError:
                break
            self.uploader.notify()
            time.sleep(0.05)
        self.uploader.stop(remaining())
        # SyncClient.stop() waits for a transfer in progress to end (up to its own 30 s). A
        # shutdown must be bounded, and an interrupted transfer is safe (chunks are stored
        # atomically and the next start fetches only what is missing), so stop the link instead.
        stopper = threading.Thread(target=self.client.stop, name="sync-stop", daemon=True)
        stopper.start()
        stopper.join(min(self.link_stop_s, remaining()))
        if stopper.is_alive():
            log.warning("sync was mid-transfer at shutdown; it resumes from the chunk store on the next start")
            self.client.transport.stop()
        for model in list(self._loaded):
            self._discard_loaded(model)
        self.outbox.close()

    # ---- releases -------------------------------------------------------------------------------

    def _target_model(self, release_model: str) -> ModelConfig | None:
        """How a synced model is served: as the configured model of its name; on a device with one
        configured model and one synced model, as that configured model (single-model configs);
        otherwise under its own name, with the daemon's profile (None if the name cannot be one)."""
        models = self.config.models
        named = next((m for m in models if m.name == release_model), None)
        if named is not None:
            return named
        synced = set(self.client.releases.models()) | set(self.client.desired().wanted) | {release_model}
        if len(models) == 1 and len(synced) == 1:
            return models[0]
        try:
            return ModelConfig(name=release_model, profile=self._profile or AUTO)
        except ValidationError:
            log.warning("synced model %r cannot be served: not a valid model name", release_model)
            return None

    def synced_models(self) -> list[ModelConfig]:
        """Models sync brought (or is bringing) that the config does not name: served under their own names."""
        configured = {m.name for m in self.config.models}
        names = sorted(set(self.client.releases.models()) | set(self.client.desired().wanted))
        targets = [self._target_model(name) for name in names]
        return [t for t in targets if t is not None and t.name not in configured]

    def local_releases(self, model_name: str) -> list[Path]:
        """Synced releases on disk for ``model_name``, best first (active, then previous)."""
        releases = self.client.releases
        found = []
        for synced in releases.models():
            target = self._target_model(synced)
            if target is not None and target.name == model_name:
                found += [f for f in (releases.active(synced), releases.previous(synced)) if f is not None]
        return found

    # ---- side state: damaged synced releases ----------------------------------------------------

    def repair(self, release_dir: Path) -> RepairReport | None:
        """Rebuild a synced release's damaged files from the local chunk store; None if
        ``release_dir`` is not a synced release (nothing to rebuild it from)."""
        release_dir = Path(release_dir).resolve()
        if release_dir.parent != self.client.releases.releases.resolve():
            return None
        return repair_release(release_dir, self.client.chunks, self.client.public_key)

    def refetch(self, release_dir: Path, missing: list[ChunkRef], then: Callable[[], None]) -> None:
        """In the background: fetch ``missing`` chunks of the damaged ``release_dir`` from its
        model's chunk store (retrying with backoff), rebuild it, then call ``then``."""
        release_dir = Path(release_dir).resolve()
        with self._loaded_lock:
            if release_dir in self._refetching:
                return
            self._refetching.add(release_dir)
        model = (parse_name(release_dir.name) or ("",))[0]

        def run() -> None:
            chunks, delay = list(missing), self.client.config.retry_min_s
            try:
                while not self._stop.is_set():
                    try:
                        entry = self.client.desired().wanted.get(model)
                        store = self.client.store((entry.store if entry else None) or self.client.config.store)
                        fetch_missing(store, self.client.chunks, chunks,
                                      time.monotonic() + self.client.config.sync_timeout_s, cancel=self._stop)
                        report = self.repair(release_dir)
                        if report is None or report.complete:
                            log.warning("%s: damaged files fetched again and rebuilt: %s", release_dir.name,
                                        report.repaired if report else [])
                            then()
                            return
                        chunks = report.missing
                    except EdgeSDKError as exc:
                        log.warning("%s: re-fetching %d damaged chunks failed, retrying in %.1fs: %s",
                                    release_dir.name, len(chunks), delay, exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.client.config.retry_max_s)
            finally:
                with self._loaded_lock:
                    self._refetching.discard(release_dir)

        threading.Thread(target=run, name=f"refetch-{model}", daemon=True).start()

    def report_serving(self, served: ServedModel, state: str, reason: str | None) -> None:
        """Reported state says what is served and why: ``models.<m>.release`` is the release
        actually serving, ``serving`` = {state: active|repaired|fallback, reason, release_dir}."""
        manifest = served.manifest
        self.client.twin.set_model(manifest.model, release={"model": manifest.model, "version": manifest.version},
                                   serving={"state": state, "reason": reason, "release_dir": str(served.release_dir)},
                                   device=device_figures(served))

    def _on_policy(self, policy: PolicyOverride) -> None:
        """Desired runtime policy changed: apply it to every served model, live (no reload)."""
        self.policy = policy
        errors = []
        for served in self.models.all():
            try:
                served.model.set_policy(policy)
            except EdgeSDKError as exc:  # the other models still get it
                errors.append(f"model {served.name}: {exc}")
        if errors:
            raise EdgeSDKError("; ".join(errors))

    def _load(self, release_dir: Path, profile: str | None) -> Selection:
        """SyncClient's self-test: the daemon's own load of the staged release, kept for the switch."""
        release_dir = Path(release_dir).resolve()
        ref = parse_name(release_dir.name)
        target = self._target_model(ref[0]) if ref is not None else None
        if target is None:
            raise EdgeSDKError(f"no configured model serves releases of {release_dir.name!r}")
        self._discard_loaded(ref[0])  # a load whose switch never came (the disk refused it)
        served = load_served(target, release_dir, public_key=self.client.public_key, policy=self.config.policy,
                             resources=self.resources)
        if self.policy is not None:
            try:  # a newly loaded model follows the desired policy too
                served.model.set_policy(self.policy)
            except EdgeSDKError as exc:
                self.client.twin.error(ErrorKind.POLICY, f"model {target.name}: {exc}")
        with self._loaded_lock:
            self._loaded[ref[0]] = served
        backend, precision = served.backend_precision()
        return Selection(backend, precision)

    def _discard_loaded(self, model: str) -> None:
        with self._loaded_lock:
            loaded = self._loaded.pop(model, None)
        if loaded is not None:
            loaded.retire()

    def _on_activate(self, release_dir: Path) -> None:
        """SyncClient switched ``current/<model>``: serve what the self-test loaded; raising rolls back."""
        model = parse_name(Path(release_dir).name)[0]
        with self._loaded_lock:
            served = self._loaded.pop(model, None)
        if served is None or served.release_dir != Path(release_dir).resolve():
            if served is not None:
                served.retire()
            raise EdgeSDKError(f"the synced release {release_dir} was not loaded by its self-test")
        if not self.on_release(served):
            raise EdgeSDKError(f"model {served.name}: the synced release {release_dir} did not load")
        backend, precision = served.backend_precision()
        device = device_figures(served)
        self.client.twin.set_model(model, backend=backend, precision=precision, device=device)
        self.last_success = time.time()
        self.record(RecordKind.RELEASE_ACTIVATED, {"model": served.name, "release": str(release_dir), "device": device},
                    high=True)

    def on_precision_switch(self, model: str, event: PolicyEvent) -> None:
        """A served model switched precision: tell the cloud (telemetry and reported state)."""
        if event.from_precision is None or event.to_precision is None:
            return
        self.record(RecordKind.PRECISION_SWITCH, {"model": model, "from": event.from_precision.value,
                                                   "to": event.to_precision.value, "kind": event.kind.value,
                                                   "reason": event.reason}, high=True)
        self.client.twin.set_model(model, precision=event.to_precision.value,
                                   memory_mode=(event.to_memory or MemoryMode.DEFAULT).value)

    # ---- telemetry ------------------------------------------------------------------------------

    def record(self, kind: RecordKind, data: dict[str, Any], high: bool = False) -> None:
        """Queue one telemetry record durably (never raises: telemetry must not break serving)."""
        try:
            self.outbox.append({"device": self.config.device_id, **data}, kind=kind.value,
                               priority=Priority.HIGH if high else Priority.NORMAL)
            self.records_queued += 1
            self.uploader.notify()
        except OutboxFullError as exc:
            self.records_lost += 1
            log.warning("telemetry record %s not queued: %s", kind, exc)
        except EdgeSDKError as exc:
            self.records_lost += 1
            log.error("telemetry record %s not queued: %s", kind, exc)

    def on_result(self, model: str, ts: float, outputs: dict[str, np.ndarray], seconds: float) -> None:
        """A pipeline result: buffered in memory, written with the next stats (one fsync per interval)."""
        record = {"model": model, "ts": ts, "ms": round(seconds * 1000, 3),
                  "outputs": {k: [round(float(x), 6) for x in list(v.ravel()[:16])] for k, v in outputs.items()}}
        with self._lock:
            self._results.append(record)
            if len(self._results) > 10_000:  # bounded between flushes: keep the newest
                del self._results[: len(self._results) - 10_000]
                self.records_lost += 1
        self.on_infer(model, None, outputs, seconds)

    def on_infer(self, model: str, inputs: dict[str, np.ndarray] | None, outputs: dict[str, np.ndarray],
                 seconds: float) -> None:
        with self._lock:
            entry = self._calls[model]
            entry[0] += 1
            entry[1] += seconds
            entry[2] = max(entry[2], seconds)

    def _flush_stats(self) -> None:
        with self._lock:
            calls, self._calls = dict(self._calls), defaultdict(lambda: [0, 0.0, 0.0])
            results, self._results = self._results, []
        if results:
            try:
                self.outbox.append_many(results, kind=RecordKind.RESULT.value, priority=Priority.LOW)
                self.records_queued += len(results)
            except EdgeSDKError as exc:
                self.records_lost += len(results)
                log.warning("%d pipeline results not queued: %s", len(results), exc)
        models = {}
        for served in self.models.all():
            backend, precision = served.backend_precision()
            count, total, worst = calls.get(served.name, [0, 0.0, 0.0])
            models[served.name] = {"version": served.version, "backend": backend, "precision": precision,
                                   "calls": int(count), "mean_ms": round(1000 * total / count, 3) if count else None,
                                   "max_ms": round(1000 * worst, 3) if count else None}
        self.record(RecordKind.STATS, {"models": models, "resources": self.client.twin.resources.sample().report()})

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._flush_stats()
            except Exception:  # a stats hiccup must not end the loop
                log.exception("telemetry stats failed")

    # ---- metrics --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        results = list(self.client.results)
        releases = self.client.releases
        active = {model: releases.active_ref(model)[1] for model in releases.models() if releases.active_ref(model)}
        by_status: dict[str, float] = defaultdict(float)
        for r in results:
            by_status[r.status.value] += 1
        stats = self.outbox.stats()
        gauges: dict[str, Any] = {
            "connected": float(self.client.transport.connected),
            "active_release_version": active,
            "outbox_records": stats.rows,
            "outbox_bytes": stats.bytes,
            "telemetry_batches_in_flight": self.uploader.in_flight,
        }
        if self.last_success is not None:
            gauges["last_success_timestamp_seconds"] = self.last_success
        counters = {
            "bytes_fetched": sum(r.bytes_fetched for r in results),
            "chunks_fetched": sum(r.chunks_fetched for r in results),
            "chunks_reused": sum(r.chunks_reused for r in results),
            "results": dict(by_status),
            "outbox_appended": stats.appended,
            "outbox_dropped": stats.dropped,
            "outbox_rejected": stats.rejected,
            "outbox_acked": stats.acked,
            "telemetry_records_sent": self.uploader.records_sent,
            "telemetry_resends": self.uploader.resends,
            "telemetry_records_lost": self.records_lost,
        }
        return Snapshot(gauges=gauges, counters=counters,
                        labels={"active_release_version": "model", "results": "status"},
                        help={"outbox_dropped": "Telemetry records dropped by the outbox quota",
                              "telemetry_records_lost": "Telemetry records never queued (outbox full or failing, "
                                                        "result buffer overflow)",
                              "bytes_fetched": "Release bytes fetched from the broker",
                              "connected": "1 while connected to the MQTT broker"})


def device_figures(served: ServedModel) -> dict[str, Any] | None:
    """What the device measured for the served release (footprint, p50/p99, verdict per variant,
    the memory ladder), for the reported state and telemetry; None if it cannot say."""
    try:
        info = served.model.info()
    except EdgeSDKError:
        return None
    if info.device is None:
        return None
    return {**info.device, "ladder": info.ladder}
