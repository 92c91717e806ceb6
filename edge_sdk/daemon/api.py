"""The inference API behind both transports: admission (slots, a bounded queue, a memory budget),
model and version lookup, inference, the repository calls, and the daemon's lifecycle flags.

HTTP and gRPC handlers parse their wire form with :mod:`.kserve`, authenticate with
:mod:`.auth`, and call :class:`InferenceApi`; so limits, timeouts, errors and metrics are the
same whichever way a call comes. Everything here runs on the daemon's event loop; inference
runs on a pool of ``max_concurrent_infer`` threads.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import __version__
from ..errors import BackendError, InputError
from .config import ApiConfig
from .kserve import ApiError, InferRequest, InferResult, Status, bind, make_result, model_config, tensor_metadata
from .metrics import DaemonMetrics
from .models import ModelTable
from .repository import Repository

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration"]


class Admission:
    """At most ``slots`` calls run; up to ``queue`` more wait in order, each for at most
    ``timeout_s``; beyond that a call is refused at once with a ``Retry-After`` estimate."""

    def __init__(self, slots: int, queue: int, timeout_s: float) -> None:
        self.slots, self.queue, self.timeout_s = slots, queue, timeout_s
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._service_s = 0.01  # moving average of one call's run time, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> float:
        return max(1.0, math.ceil((self.waiting + 1) * self._service_s / self.slots))

    async def acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.queue:
            raise ApiError(Status.UNAVAILABLE, f"overloaded: {self.running} calls running and {self.waiting} waiting "
                                               f"(api.max_queue {self.queue}); retry later", self.retry_after())
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived as the wait ended: keep it
            waiter.cancel()
            raise ApiError(Status.UNAVAILABLE, f"waited {self.timeout_s:g}s for an inference slot "
                                               "(api.queue_timeout_s); retry later", self.retry_after()) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as this call was cancelled
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, seconds: float | None = None) -> None:
        if seconds is not None:
            self._service_s = 0.8 * self._service_s + 0.2 * seconds
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self.running -= 1


class MemoryBudget:
    """Bytes of tensors held by calls being read or waiting; a call that would exceed it is refused."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> int:
        with self._lock:
            if self.used + nbytes > self.limit:
                raise ApiError(Status.UNAVAILABLE, f"overloaded: {self.used} bytes of request tensors held, "
                                                   f"{nbytes} more would pass api.max_buffered_bytes ({self.limit})", 1.0)
            self.used += nbytes
        return nbytes

    def free(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class InferenceApi:
    """One daemon's API state; see the module docstring."""

    def __init__(self, models: ModelTable, repository: Repository, metrics: DaemonMetrics, config: ApiConfig) -> None:
        self.models, self.repository, self.metrics, self.config = models, repository, metrics, config
        self.admission = Admission(config.max_concurrent_infer, config.max_queue, config.queue_timeout_s)
        self.budget = MemoryBudget(config.max_buffered_bytes)
        self._executor = ThreadPoolExecutor(config.max_concurrent_infer, thread_name_prefix="infer")
        self.draining = False
        self.started = False
        self.in_flight = 0
        self._cond = threading.Condition()
        #: Called after every successful inference (model name, inputs, outputs, seconds).
        self.on_infer: Any = None
        #: The daemon's sensor pipelines (edge_sdk.daemon.pipeline.Pipelines), if any.
        self.pipelines: Any = None
        metrics.add_source("api", self._snapshot)

    def _snapshot(self):
        from .metrics import Snapshot

        return Snapshot(gauges={"queue_waiting": self.admission.waiting, "infer_running": self.admission.running,
                                "buffered_bytes": self.budget.used},
                        help={"queue_waiting": "Inference calls waiting for a slot",
                              "infer_running": "Inference calls running now",
                              "buffered_bytes": "Request tensor bytes held by calls being read or waiting"})

    # ---- lifecycle -----------------------------------------------------------------------------

    def enter(self) -> None:
        """Count a call from its first byte (so a slow upload is drained too); refused when draining."""
        with self._cond:
            if self.draining:
                raise ApiError(Status.UNAVAILABLE, "the daemon is shutting down", 1.0)
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to ``timeout`` s for in-flight ones; True if all finished."""
        with self._cond:
            self.draining = True
            return self._cond.wait_for(lambda: self.in_flight == 0, timeout=timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.repository.close()

    def set_concurrency(self, slots: int) -> None:
        """SIGHUP: a new ``max_concurrent_infer`` (the thread pool grows; it never shrinks below)."""
        self.admission.slots = slots
        self._executor._max_workers = max(self._executor._max_workers, slots)

    def ready(self) -> tuple[bool, list[str]]:
        """Ready = started, not draining, and every configured model has something loaded."""
        problems = []
        if not self.started:
            problems.append("starting")
        if self.draining:
            problems.append("shutting down")
        for name in self.models.names():
            if self.models.get(name) is None:
                problems.append(f"model {name}: {self.models.error(name) or 'not loaded'}")
        return not problems, problems

    # ---- metadata ------------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edge-sdk", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        view = self.repository.view(name, version)
        variant, backend, precision = self._variant(view)
        return {
            "name": name,
            "versions": [str(v) for v in self.repository.versions(name)],
            "platform": backend,
            "inputs": tensor_metadata(variant.inputs),
            "outputs": tensor_metadata(variant.outputs),
            "parameters": {"backend": backend, "precision": precision, "release_version": view.version,
                           "variant": variant.id, "loaded": view.served is not None,
                           "release_dir": str(view.served.release_dir if view.served is not None
                                              else view.release.release_dir)},
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        view = self.repository.view(name, version)
        variant, backend, precision = self._variant(view)
        return model_config(name, view.manifest, variant.id, backend, precision, self.repository.versions(name))

    @staticmethod
    def _variant(view):
        manifest = view.manifest
        info = view.served.info() if view.served is not None else None
        ok = [v for v in manifest.variants if v.ok] or manifest.variants
        if info is not None:
            variant = next((v for v in manifest.variants if v.id == info.variant), ok[0])
            return variant, info.backend, info.precision.value
        return ok[0], ok[0].backend, ok[0].precision.value

    def model_ready(self, name: str, version: str | None) -> bool:
        return not self.draining and self.repository.ready(name, version)

    def label(self, name: str) -> str:
        # Metric labels only for configured models: a client sending random names must not be
        # able to grow the metrics registry without bound.
        return name if self.repository.has(name) else "_unknown"

    # ---- inference -----------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResult:
        """Run one parsed request: look up, take a slot (after the body was read), run, write."""
        label = self.label(name)
        try:
            served = await self.repository.checkout(name, version)
        except ApiError as exc:
            reason = "unknown_model" if exc.status is Status.NOT_FOUND else "unavailable"
            self.metrics.infer_errors.labels(label, reason).inc()
            raise
        try:
            feed = bind(request, served.inputs, served.outputs)
            await self.admission.acquire()
            elapsed = None
            try:
                started = time.perf_counter()
                outputs = await asyncio.get_running_loop().run_in_executor(self._executor, served.run, feed)
                elapsed = time.perf_counter() - started
                backend, precision = served.labels()
            finally:
                self.admission.release(elapsed)
            result = make_result(name, served.version, request, outputs, served.manifest.labels)
        except ApiError as exc:
            reason = "busy" if exc.status is Status.UNAVAILABLE else "bad_request"
            self.metrics.infer_errors.labels(label, reason).inc()
            raise
        except InputError as exc:
            self.metrics.infer_errors.labels(label, "bad_input").inc()
            raise ApiError(Status.INVALID_ARGUMENT, str(exc)) from None
        except BackendError as exc:
            self.metrics.infer_errors.labels(label, "backend").inc()
            log.error("model %s: inference failed: %s", name, exc)
            raise ApiError(Status.INTERNAL, f"inference failed: {exc}") from None
        except Exception as exc:  # the daemon keeps serving whatever one call did
            self.metrics.infer_errors.labels(label, "internal").inc()
            log.exception("model %s: unexpected inference error", name)
            raise ApiError(Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}") from None
        finally:
            served.release()
        self.metrics.infer_latency.labels(name, backend, precision).observe(elapsed)
        if self.on_infer is not None:
            try:
                self.on_infer(name, request.inputs, outputs, elapsed)
            except Exception:  # telemetry hooks must not fail the call
                log.exception("on_infer hook failed")
        return result
