"""The daemon process: load models, serve the HTTP API, keep in sync, handle signals.

Lifecycle::

    start: stop signals handled → check state dir → bind the socket (port in use = clear
           error) → start sync (never blocks: offline-first) → load each model (synced release
           if any, else the configured folder; a broken one is logged and the API says why)
           → READY. A stop signal during start-up skips what is left and exits 0.
    SIGHUP: read + validate the config file; a bad one is logged and the running one kept;
           a good one re-loads models whose settings changed, and logging
    SIGTERM/SIGINT: stop accepting calls (ready → 503), drain in-flight ones for up to
           ``drain_timeout_s``, stop the HTTP server, stop sync (outbox flushed to disk),
           close models, exit 0 — all within ``shutdown_timeout_s`` of the signal
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import ConfigError, EdgeSDKError, IntegrityError, MissingDependencyError
from ..runtime.monitor import SystemSource
from ..runtime.policy import PolicyEvent
from . import systemd
from .config import DaemonConfig, ModelConfig, load_config
from .api import InferenceApi
from .auth import Authenticator, ensure_tokens_file, is_loopback
from .http import Listener, create_app, protocol_class
from .repository import Repository, release_folders
from .logs import setup_logging
from .metrics import DaemonMetrics, Snapshot
from .models import ModelTable, ServedModel, load_served
from .pipeline import Pipelines
from .sync import SyncBridge
from ..trust import TrustRoot, TrustStore, load_trust

if TYPE_CHECKING:  # pragma: no cover - uvicorn is imported when the server starts
    import uvicorn

log = logging.getLogger("edge_sdk.daemon")

PORT_FILE = "http.port"
GRPC_PORT_FILE = "grpc.port"


def check_state_dir(path: Path, sync: bool = False) -> None:
    """Create ``path`` if needed and prove we can write there (else a clear ConfigError).

    With ``sync``, also the places sync writes to: the ``sync/`` folder and the outbox file, so
    a bad one is a clear error at start, not a traceback from deep inside the sync client.
    """
    target = path
    try:
        folders = [path, path / "sync"] if sync else [path]
        for target in folders:
            target.mkdir(parents=True, exist_ok=True)
            probe = target / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        target = path / "outbox.db"
        if sync and target.exists():
            with target.open("r+b"):  # opened for writing, not written: proves SQLite can use it
                pass
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk must not stop serving: the releases on it are intact; the outbox and
            # sync apply their own disk-full rules and report what they lose.
            log.warning("state_dir %s: the disk is full (%s); serving anyway", path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                (target / f".write-test-{os.getpid()}").unlink()
            return
        raise ConfigError(f"state_dir {path}: {target} is not usable ({exc.strerror or exc})") from None


def bind_socket(config: DaemonConfig) -> socket.socket:
    """Bind the API socket ourselves, so 'port in use' is our error, not a server's sys.exit."""
    http = config.http
    if http.unix_socket is not None:
        path = http.unix_socket
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # a stale socket from a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o660)
        except OSError as exc:
            raise ConfigError(f"http.unix_socket {path}: cannot bind ({exc.strerror or exc})") from None
    else:
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Inherited by accepted connections on Linux: without it, a response written in two
            # parts (headers, body) waits ~40 ms for the client's delayed ACK (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((http.host, http.port))
        except OSError as exc:
            sock.close()
            what = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
            raise ConfigError(f"http {http.host}:{http.port} {what}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Daemon:
    """One running daemon. ``run()`` blocks until SIGTERM/SIGINT (or :meth:`stop`) and returns 0."""

    def __init__(self, config: DaemonConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = DaemonMetrics()
        self.models = ModelTable()
        self.repository = Repository(self.models, lambda: [m.name for m in self.served_configs()], self._releases_of,
                                     self._load_version, self._load_named, config.api.max_inactive_versions)
        self.api = InferenceApi(self.models, self.repository, self.metrics, config.api)
        self.auth = Authenticator(config.api, config.api.auth.tokens_file or config.state_dir / "api-tokens")
        self._grpc: Any = None
        self.sync: SyncBridge | None = None  # when a broker is configured
        self.pipelines: Pipelines | None = None  # sensor pipelines (aligner → model), when configured
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._shutdown_deadline: float | None = None  # time.monotonic() the shutdown must end by
        self._reload_lock = threading.Lock()
        self._unsubscribe: list[Callable[[], None]] = []
        self.bound_address: str = ""
        self.started_at = time.monotonic()
        #: The one reader of resource figures: the precision policy, /metrics, twin and telemetry.
        self.resources = SystemSource(config.policy.resource_root or "/")
        self.metrics.add_source("resource", self._resource_snapshot)
        #: The keys releases must be signed with: the configured root, moved forward by the roots
        #: sync accepted (kept under state_dir/sync/trust), for local and synced releases alike.
        self.trust = (TrustStore(load_trust(config.sync.public_key), config.state_dir / "sync" / "trust")
                      if config.sync.public_key is not None else None)

    @property
    def trust_root(self) -> TrustRoot | None:
        return self.trust.current if self.trust is not None else None

    def _resource_snapshot(self) -> Snapshot:
        """The same figures the precision policy decides on (cgroup-aware), read at scrape time."""
        sample = self.resources.sample()
        gauges: dict[str, float] = {
            "available_memory_bytes": sample.available_memory_mb * 2**20,
            "process_rss_bytes": sample.process_rss_mb * 2**20,
            "cpu_percent": sample.cpu_percent,
        }
        if sample.temperature_c is not None:
            gauges["temperature_celsius"] = sample.temperature_c
        if sample.throttled is not None:
            gauges["throttled"] = float(sample.throttled)
        return Snapshot(gauges=gauges, help={
            "available_memory_bytes": "Free memory the policy sees: min(host available, cgroup headroom)",
            "process_rss_bytes": "Resident memory of the daemon (models included)",
            "cpu_percent": "CPU utilisation of the CPUs this process may use",
            "temperature_celsius": "SoC temperature", "throttled": "1 if the SoC caps its clock now"})

    # ---- models ---------------------------------------------------------------------------------

    def _candidates(self, model: ModelConfig) -> list[Path]:
        """Release folders to try, best first: what sync activated last, then the configured one."""
        found: list[Path] = []
        if self.sync is not None:
            found += [p for p in self.sync.local_releases(model.name) if p is not None]
        if model.release is not None:
            found += release_folders(model.release)
        return found

    def served_configs(self) -> list[ModelConfig]:
        """The configured models, then those sync brought that the config does not name (each
        served under its own name)."""
        return [*self.config.models, *(self.sync.synced_models() if self.sync is not None else [])]

    def _model_config(self, name: str) -> ModelConfig | None:
        return next((m for m in self.served_configs() if m.name == name), None)

    def _releases_of(self, name: str) -> list[Path]:
        """The API's versions of ``name``: every release folder present for it."""
        model = self._model_config(name)
        return self._candidates(model) if model is not None else []

    def _load_version(self, name: str, release_dir: Path) -> ServedModel:
        """A non-active version, for the API (not activated: the table keeps serving the active one)."""
        return load_served(self._model_config(name), release_dir, public_key=self.trust_root,
                           policy=self.config.policy, resources=self.resources)

    def _load_named(self, name: str) -> bool:
        model = self._model_config(name)
        return model is not None and self.load_model(model) is not None

    def load_model(self, model: ModelConfig, release_dir: Path | None = None) -> ServedModel | None:
        """Load and activate ``model`` (from ``release_dir`` or its best candidate); None if none
        loads, or when the daemon is shutting down."""
        candidates = [release_dir] if release_dir is not None else self._candidates(model)
        errors = []
        for folder in candidates:
            if self._stopping:
                log.info("model %s: not loading %s: shutting down", model.name, folder)
                return None
            try:
                served, repaired = self._load_or_repair(model, folder)
            except EdgeSDKError as exc:
                errors.append(f"{folder}: {exc}")
                log.error("model %s: cannot load %s: %s", model.name, folder, exc)
                continue
            except Exception as exc:  # a corrupt release must not stop the daemon
                errors.append(f"{folder}: {type(exc).__name__}: {exc}")
                log.exception("model %s: unexpected error loading %s", model.name, folder)
                continue
            if errors:  # a better candidate failed: say so, the cloud must not think it runs
                return served if self._activate(served, "fallback", "; ".join(errors)) else None
            return served if self._activate(served, "repaired" if repaired else "active", repaired) else None
        if self.models.get(model.name) is None:
            self.models.set_error(model.name, "; ".join(errors) or "no release yet (waiting for sync)")
        return None

    def _load_or_repair(self, model: ModelConfig, folder: Path) -> tuple[ServedModel, str | None]:
        """Load ``folder``; a synced release whose files fail their hashes is rebuilt from the local
        chunk store and loaded again (returns why, else None). Chunks that are not local are
        fetched again in the background, and the release served once rebuilt."""
        def load() -> ServedModel:
            return load_served(model, folder, public_key=self.trust_root, policy=self.config.policy,
                               resources=self.resources)

        try:
            return load(), None
        except IntegrityError as exc:
            if self.sync is None:
                raise
            started = time.monotonic()
            try:
                report = self.sync.repair(folder)
            except EdgeSDKError as why:  # the manifest itself is bad: only a new sync helps
                log.error("model %s: %s cannot be rebuilt: %s", model.name, folder, why)
                raise exc from None
            if report is None or not report.complete:
                if report is not None:
                    log.error("model %s: %s is damaged (%s); %d chunks are not local: fetching them again",
                              model.name, folder, exc, len(report.missing))
                    self.sync.refetch(folder, report.missing, lambda: self.load_model(model, folder))
                raise
            why = f"{', '.join(report.repaired) or 'nothing'} rebuilt from local chunks ({exc})"
            log.warning("model %s: %s was damaged: %s in %.0f ms", model.name, folder, why,
                        (time.monotonic() - started) * 1000)
            return load(), why

    def _activate(self, served: ServedModel, state: str = "active", reason: str | None = None) -> bool:
        """Serve ``served``; False (and it is closed) when the daemon is shutting down. ``state``
        and ``reason`` (active, repaired, fallback) go to the reported state."""
        # A load that ends during shutdown must not leave a model open once the table is closed;
        # put() refuses (and closes the model) when close() got there first.
        if self._stopping:
            served.retire()
            accepted = False
        else:
            accepted = self.models.put(served)
        if not accepted:
            log.info("model %s: v%s loaded during shutdown; not served", served.name, served.version)
            return False
        backend, precision = served.backend_precision()
        self.metrics.set_active(served.name, str(served.version), backend, precision)
        self._watch_precision(served)
        log.info("model %s: serving v%s from %s (%s, %s)", served.name, served.version, served.release_dir, backend, precision)
        if self.sync is not None:
            self.sync.report_serving(served, state, reason)
        return True

    def _watch_precision(self, served: ServedModel) -> None:
        """Count the EdgeModel's precision switches (by decision kind) and keep the active gauge right."""

        def on_event(event: PolicyEvent) -> None:
            old, new = event.from_precision, event.to_precision
            if old is None or new is None or old == new or event.error:
                return
            # The label is the decision kind (step_down, step_up, pin, unpin): bounded, unlike
            # the free-text reason, which goes to the log and telemetry.
            kind = event.kind.value
            self.metrics.precision_switches.labels(served.name, old.value, new.value, kind).inc()
            if self.sync is not None:
                self.sync.on_precision_switch(served.name, event)
            backend, precision = served.backend_precision()
            if self.models.get(served.name) is served:
                self.metrics.set_active(served.name, str(served.version), backend, precision)
            log.info("model %s: precision %s -> %s (%s)", served.name, old.value, new.value, event.reason)

        try:
            self._unsubscribe.append(served.model.subscribe(on_event))
        except Exception as exc:
            log.warning("model %s: cannot watch precision changes: %s", served.name, exc)

    def on_release(self, served: ServedModel) -> bool:
        """Called by sync once a synced release, loaded and self-tested, is active on disk: hot-swap
        to it. False (and ``served`` closed) when no configured model is called that any more."""
        if self._model_config(served.name) is None:
            log.warning("sync activated %s for model %s, which is no longer configured", served.release_dir, served.name)
            served.retire()
            return False
        if not self._activate(served):
            # Verified and active on disk, so the next start serves it; saying False here would
            # make sync roll the release back.
            log.info("model %s: %s is served after the restart (shutting down)", served.name, served.release_dir)
        return True

    # ---- reload ---------------------------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: validate the config file first; apply it only if it is good."""
        if self.config_path is None:
            log.warning("reload requested but the daemon was not started from a file")
            return False
        with self._reload_lock:
            if self._stopping:
                log.info("reload skipped: shutting down")
                return False
            systemd.reloading()
            try:
                new = load_config(self.config_path)
                check_state_dir(new.state_dir, sync=new.sync.broker is not None)
            except EdgeSDKError as exc:
                self.metrics.reloads.labels("rejected").inc()
                log.error("reload rejected, keeping the running config: %s", exc)
                systemd.notify("READY=1")
                return False
            old = self.config
            restart_only = [k for k in ("device_id", "state_dir", "api", "http", "grpc", "pipelines", "sync", "outbox") if getattr(old, k) != getattr(new, k)]
            if restart_only:
                log.warning("reload: changes to %s take effect after a restart", restart_only)
                new = new.model_copy(update={k: getattr(old, k) for k in restart_only})
            self.config = new
            if self.sync is not None:
                self.sync.reconfigure(new)
            setup_logging(new.logging)
            for note in new.deprecations:
                log.warning("config: %s", note)
            old_models = {m.name: m for m in old.models}
            for model in new.models:
                if old_models.get(model.name) != model or old.policy != new.policy:
                    self.load_model(model)
            for name in set(old_models) - {m.name for m in new.models}:
                self.models.remove(name)
                log.info("model %s: removed by reload", name)
            self.api.set_concurrency(new.api.max_concurrent_infer)
            self.metrics.reloads.labels("applied").inc()
            log.info("config reloaded from %s", self.config_path)
            systemd.notify("READY=1")
            return True

    # ---- run ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a stop signal, shut down cleanly; returns the exit status."""
        # Stop signals are handled from the first moment: one that lands during start-up (state
        # dir, sync, model loads) ends start-up early and exits 0, instead of status 143 (SIGTERM)
        # or a KeyboardInterrupt traceback (SIGINT); SIGHUP's default action would kill the
        # process. The event loop takes them over in _main.
        previous = {sig: signal.signal(sig, handler) for sig, handler in (
            (signal.SIGTERM, self._on_early_signal), (signal.SIGINT, self._on_early_signal),
            (signal.SIGHUP, self._on_early_hup))}
        try:
            setup_logging(self.config.logging)
            for note in self.config.deprecations:
                log.warning("config: %s", note)
            check_state_dir(self.config.state_dir, sync=self.config.sync.broker is not None)
            if self._listeners_needing_tokens():
                auth = self.config.api.auth
                ensure_tokens_file(auth.tokens_file or self.config.state_dir / "api-tokens", auth.create_tokens_file)
            sock = bind_socket(self.config)
            try:
                return asyncio.run(self._main(sock))
            finally:
                with contextlib.suppress(OSError):
                    sock.close()
                if self.config.http.unix_socket is not None:
                    with contextlib.suppress(OSError):
                        self.config.http.unix_socket.unlink()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_early_signal(self, sig: int, frame: FrameType | None) -> None:
        self._on_stop_signal(sig)

    def _on_early_hup(self, sig: int, frame: FrameType | None) -> None:
        log.warning("SIGHUP ignored: still starting (the config was read at start; send it again once ready)")

    async def _main(self, sock: socket.socket) -> int:
        try:
            import uvicorn
        except ImportError:
            raise MissingDependencyError("uvicorn", "daemon", "The daemon's HTTP server") from None
        self._loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self._on_stop_signal), (signal.SIGINT, self._on_stop_signal),
                             (signal.SIGHUP, self._on_hup)):
            self._loop.add_signal_handler(sig, handler, sig)
        if not self._stopping:
            self._start_sync()
        for model in self.served_configs():  # synced models beyond the config too (serving before the broker)
            if self._stopping:
                break
            await asyncio.to_thread(self.load_model, model)
        if self.config.pipelines and not self._stopping:
            self.pipelines = Pipelines(self.config.pipelines, self.models,
                                       self.sync.on_result if self.sync is not None else None)
            self.api.pipelines = self.pipelines
            self.metrics.add_source("aligner", self.pipelines.snapshot)

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the daemon handles signals itself (drain first)
                yield

        http = self.config.http
        listener = Listener(loopback=http.unix_socket is None and is_loopback(http.host),
                            transport_authenticated=http.unix_socket is not None or
                            (http.tls is not None and http.tls.client_ca is not None))
        limits = self.config.api
        protocol = protocol_class(limits.header_timeout_s, limits.max_connections,
                                  lambda: self.metrics.timeouts.labels("header").inc())
        # limit_concurrency stays off: uvicorn would answer 503 to everyone once that many
        # connections are open, idle ones included; the protocol evicts idle ones instead.
        uconfig = uvicorn.Config(create_app(self.api, self.auth, listener), log_config=None, access_log=False,
                                 lifespan="off", http=protocol,
                                 timeout_graceful_shutdown=5, timeout_keep_alive=5,
                                 server_header=False)
        uconfig.load()
        if http.tls is not None and http.unix_socket is None:
            from .auth import server_ssl_context

            uconfig.ssl = server_ssl_context(http.tls)
        self._server = _Server(uconfig)
        # Checked after _server is set: a stop() from now on reaches the server via the drain thread.
        if self._stopping:
            log.info("stop requested during start-up; not serving")
        else:
            await self._serve(sock)
        await asyncio.to_thread(self._shutdown_rest)
        log.info("stopped")
        return 0

    def _listeners_needing_tokens(self) -> list[str]:
        found = []
        for key, listener in (("http", self.config.http), ("grpc", self.config.grpc)):
            if key == "grpc" and not listener.enabled:
                continue
            by_transport = listener.unix_socket is not None or (listener.tls is not None and listener.tls.client_ca)
            anonymous = self.config.api.auth.anonymous_loopback and listener.unix_socket is None and is_loopback(listener.host)
            if not by_transport and not anonymous:
                found.append(key)
        return found

    async def _start_grpc(self) -> None:
        """The gRPC listener (same API object, same loop); its port goes to ``grpc.port``."""
        grpc = self.config.grpc
        if not grpc.enabled:
            return
        from .grpc_server import GrpcServer, server_credentials

        listener = Listener(loopback=grpc.unix_socket is None and is_loopback(grpc.host),
                            transport_authenticated=grpc.unix_socket is not None or
                            (grpc.tls is not None and grpc.tls.client_ca is not None))
        if grpc.unix_socket is not None:
            grpc.unix_socket.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                grpc.unix_socket.unlink()  # a stale socket from a previous run
            address = f"unix:{grpc.unix_socket}"
        else:
            address = f"[{grpc.host}]:{grpc.port}" if ":" in grpc.host else f"{grpc.host}:{grpc.port}"
        credentials = server_credentials(grpc.tls) if grpc.tls is not None and grpc.unix_socket is None else None
        self._grpc = GrpcServer(self.api, self.auth, listener, address, credentials)
        try:
            port = await self._grpc.start()
        except RuntimeError as exc:  # grpc: "Failed to bind to address"
            raise ConfigError(f"grpc {address} cannot be bound (in use?): {exc}") from None
        if grpc.unix_socket is not None:
            os.chmod(grpc.unix_socket, 0o660)
            log.info("gRPC listening on unix:%s", grpc.unix_socket)
        else:
            self._write_file(GRPC_PORT_FILE, f"{port}\n")
            log.info("gRPC listening on %s:%d", grpc.host, port)

    async def _serve(self, sock: socket.socket) -> None:
        await self._start_grpc()
        serve = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not serve.done():
            await asyncio.sleep(0.02)
        if serve.done():
            serve.result()  # raises what went wrong
        self.bound_address = self._address(sock)
        self._write_port_file(sock)
        self.api.started = True
        ready_s = time.monotonic() - self.started_at
        loaded = [m.name for m in self.models.all()]
        missing = [n for n in self.models.names() if n not in loaded]
        log.info("listening on %s after %.2fs; serving %s%s", self.bound_address, ready_s, loaded,
                 f"; not loaded yet: {missing}" if missing else "")
        systemd.notify("READY=1")
        watchdog = asyncio.create_task(self._watchdog())
        await serve
        watchdog.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)

    def _address(self, sock: socket.socket) -> str:
        if sock.family == socket.AF_UNIX:
            return f"unix:{sock.getsockname()}"
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def _write_port_file(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX:
            self._write_file(PORT_FILE, f"{sock.getsockname()[1]}\n")

    def _write_file(self, name: str, text: str) -> None:
        path = self.config.state_dir / name
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: these files are a convenience, serving is not
            log.error("cannot write %s (%s); serving anyway", path, exc.strerror or exc)
            tmp.unlink(missing_ok=True)

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _on_hup(self, sig: int) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        # Loading models takes time: do it off the event loop so the API keeps answering.
        asyncio.get_running_loop().run_in_executor(None, self.reload)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            log.warning("%s again: stopping without waiting", signal.Signals(sig).name)
            if self._server is not None:
                self._server.force_exit = True
            return
        log.info("%s: draining in-flight calls (up to %.1fs; shutdown within %.1fs)", signal.Signals(sig).name,
                 self.config.drain_timeout_s, self.config.shutdown_timeout_s)
        self.stop()

    def _remaining(self) -> float:
        """Seconds left of the shutdown deadline (``shutdown_timeout_s`` after the stop began)."""
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + self.config.shutdown_timeout_s
        return max(0.0, self._shutdown_deadline - time.monotonic())

    def stop(self) -> None:
        """Begin a graceful stop (thread-safe); the whole shutdown ends within ``shutdown_timeout_s``."""
        if self._stopping:
            return
        self._stopping = True
        self._remaining()  # starts the clock
        systemd.notify("STOPPING=1")

        def drain() -> None:
            started = time.monotonic()
            drained = self.api.drain(min(self.config.drain_timeout_s, self._remaining()))
            waited = time.monotonic() - started
            if drained:
                log.info("drained in %.2fs", waited)
            else:
                log.warning("drain timeout: %d call(s) still running after %.1fs", self.api.in_flight, waited)
            server = self._server
            if server is not None:
                # Connections still open have overrun the drain already: a short last chance, so
                # that sync and the outbox keep most of what is left of the deadline.
                server.config.timeout_graceful_shutdown = max(0.1, min(5.0, self._remaining() / 2))
                server.should_exit = True

        threading.Thread(target=drain, name="drain", daemon=True).start()

    def _shutdown_rest(self) -> None:
        if self.pipelines is not None:
            self.pipelines.drain(timeout=min(5.0, self._remaining()))
        if self.sync is not None:
            try:
                self.sync.stop(deadline=time.monotonic() + self._remaining())
            except Exception:
                log.exception("sync did not stop cleanly")
        # A reload in progress finishes (its loads are refused now) before the models close.
        if not self._reload_lock.acquire(timeout=self._remaining()):
            log.warning("a reload is still running at the shutdown deadline")
        else:
            self._reload_lock.release()
        for unsubscribe in self._unsubscribe:
            with contextlib.suppress(Exception):
                unsubscribe()
        self.api.close()
        self.models.close()
        for name in (PORT_FILE, GRPC_PORT_FILE):
            with contextlib.suppress(OSError):
                (self.config.state_dir / name).unlink()

    # ---- sync -----------------------------------------------------------------------------------

    def _start_sync(self) -> None:
        if self.config.sync.broker is None:
            return
        try:
            self.sync = SyncBridge(self.config, self.models, self.on_release, self.resources, self.trust)
            self.sync.start()
            self.api.on_infer = self.sync.on_infer
        except MissingDependencyError:
            raise
        except EdgeSDKError as exc:
            # Offline-first: a sync problem at start leaves the daemon serving what it has.
            log.error("sync not started: %s (serving local releases only)", exc)
        self.metrics.add_source("sync", self._sync_snapshot)

    def _sync_snapshot(self) -> Snapshot:
        return self.sync.snapshot() if self.sync is not None else Snapshot()


def run_daemon(config_path: Path) -> int:
    """Entry point of ``edge-sdk daemon --config``: load the file, run, return the exit status."""
    config = load_config(config_path)
    return Daemon(config, config_path).run()
