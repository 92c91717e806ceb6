"""The daemon's side of fleet sync: ``SyncClient`` + durable outbox + telemetry uploader.

Offline-first: nothing here blocks start-up. The MQTT transport connects in the background;
while the broker is away the daemon serves the last active release from disk and telemetry
records pile up in the SQLite outbox, to be uploaded (and deleted on ingest acks) later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EdgeSDKError, OutboxFullError
from .metrics import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from .service import Daemon

log = logging.getLogger(__name__)


class SyncBridge:
    """Owns the SyncClient, the outbox and the uploader of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        from ..profiles import detect_profile
        from ..runtime.sync.client import SyncClient
        from ..runtime.sync.client import SyncConfig as ClientConfig
        from ..runtime.sync.outbox import Outbox, OutboxConfig
        from ..runtime.sync.telemetry import TelemetryUploader
        from ..runtime.sync.transport import TlsConfig

        self.daemon = daemon
        config = daemon.config
        sync = config.sync
        profiles = {m.profile for m in config.models}
        profile = profiles.pop() if len(profiles) == 1 else None
        if profile == "auto":
            profile = detect_profile().profile.id
        self.root = config.state_dir / "sync"
        tls = (TlsConfig(ca_certs=sync.tls.ca, certfile=sync.tls.cert, keyfile=sync.tls.key)
               if sync.tls is not None else None)
        self.client = SyncClient(
            ClientConfig(broker=sync.broker, fleet=sync.fleet, device=config.device_id, root=self.root, profile=profile,
                         public_key=sync.public_key, allow_unsigned=sync.allow_unsigned, prefix=sync.topic_prefix or "",
                         tls=tls),
            on_activate=self._on_activate, on_policy=self._on_policy,
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
        self.records_queued = 0
        self.records_lost = 0
        self.last_success: float | None = None  # wall time of the last release activation
        self.policy: Any = None  # the desired runtime policy (PolicyOverride) last received
        self._results: list[dict[str, Any]] = []
        #: How long a clean SyncClient.stop() may take at shutdown before the link is cut.
        self.link_stop_s = 3.0

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
        self.outbox.close()

    # ---- releases -------------------------------------------------------------------------------

    def _target_model(self, release_model: str) -> str | None:
        """The configured model a synced release is served as: same name, or the only one."""
        names = [m.name for m in self.daemon.config.models]
        if release_model in names:
            return release_model
        return names[0] if len(names) == 1 else None

    def local_releases(self, model_name: str) -> list[Path]:
        """Synced releases on disk for ``model_name``, best first (active, then previous)."""
        releases = self.client.releases
        return [folder for synced in releases.models() if self._target_model(synced) == model_name
                for folder in (releases.active(synced), releases.previous(synced)) if folder is not None]

    def _on_policy(self, policy: Any) -> None:
        """Desired runtime policy changed: apply it to every served model, live (no reload)."""
        self.policy = policy
        errors = []
        for served in self.daemon.models.all():
            try:
                served.model.set_policy(policy)
            except EdgeSDKError as exc:  # the other models still get it
                errors.append(f"model {served.name}: {exc}")
        if errors:
            raise EdgeSDKError("; ".join(errors))

    def _on_activate(self, release_dir: Path) -> None:
        """SyncClient switched ``current``: hot-swap; raising makes the client roll back."""
        manifest_model = Path(release_dir).resolve().name.split("@")[0]
        target = self._target_model(manifest_model)
        if target is None:
            raise EdgeSDKError(f"no configured model serves releases of {manifest_model!r}")
        if not self.daemon.on_release(target, Path(release_dir).resolve()):
            raise EdgeSDKError(f"model {target}: the synced release {release_dir} did not load")
        served = self.daemon.models.get(target)
        if served is not None and self.policy is not None:
            try:  # a newly loaded model follows the desired policy too
                served.model.set_policy(self.policy)
            except EdgeSDKError as exc:
                self.client.twin.error("policy", f"model {target}: {exc}")
        if served is not None:
            backend, precision = served.backend_precision()
            self.client.twin.set_model(manifest_model, backend=backend, precision=precision)
        self.last_success = time.time()
        self.record("release_activated", {"model": target, "release": str(release_dir)}, high=True)

    # ---- telemetry ------------------------------------------------------------------------------

    def record(self, kind: str, data: dict[str, Any], high: bool = False) -> None:
        """Queue one telemetry record durably (never raises: telemetry must not break serving)."""
        from ..runtime.sync.outbox import Priority

        try:
            self.outbox.append({"device": self.daemon.config.device_id, **data}, kind=kind,
                               priority=Priority.HIGH if high else Priority.NORMAL)
            self.records_queued += 1
            self.uploader.notify()
        except OutboxFullError as exc:
            self.records_lost += 1
            log.warning("telemetry record %s not queued: %s", kind, exc)
        except EdgeSDKError as exc:
            self.records_lost += 1
            log.error("telemetry record %s not queued: %s", kind, exc)

    def on_result(self, model: str, ts: float, outputs: dict[str, Any], seconds: float) -> None:
        """A pipeline result: buffered in memory, written with the next stats (one fsync per interval)."""
        record = {"model": model, "ts": ts, "ms": round(seconds * 1000, 3),
                  "outputs": {k: [round(float(x), 6) for x in list(v.ravel()[:16])] for k, v in outputs.items()}}
        with self._lock:
            self._results.append(record)
            if len(self._results) > 10_000:  # bounded between flushes: keep the newest
                del self._results[: len(self._results) - 10_000]
                self.records_lost += 1
        self.on_infer(model, None, outputs, seconds)

    def on_infer(self, model: str, inputs: Any, outputs: Any, seconds: float) -> None:
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
            from ..runtime.sync.outbox import Priority

            try:
                self.outbox.append_many(results, kind="result", priority=Priority.LOW)
                self.records_queued += len(results)
            except EdgeSDKError as exc:
                self.records_lost += len(results)
                log.warning("%d pipeline results not queued: %s", len(results), exc)
        models = {}
        for served in self.daemon.models.all():
            backend, precision = served.backend_precision()
            count, total, worst = calls.get(served.name, [0, 0.0, 0.0])
            models[served.name] = {"version": served.version, "backend": backend, "precision": precision,
                                   "calls": int(count), "mean_ms": round(1000 * total / count, 3) if count else None,
                                   "max_ms": round(1000 * worst, 3) if count else None}
        from ..runtime.sync.twin import resource_snapshot

        self.record("stats", {"models": models, "resources": resource_snapshot()})

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
            by_status[r.status] += 1
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
