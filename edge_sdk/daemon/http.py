"""The local inference API: the Open Inference Protocol (KServe v2) over HTTP, plus ``/metrics``.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON tensors, and the binary
tensor extension: ``Inference-Header-Content-Length`` + ``binary_data_size``), ``GET /metrics``.
Beyond KServe: ``POST /v2/pipelines/{model}/streams/{stream}`` pushes timestamped sensor samples
into the daemon's aligner (see :mod:`.pipeline`); ``GET /v2/pipelines/{model}`` reports it.
Anything malformed gets a 4xx with ``{"error": "..."}``; nothing a client sends escapes as an
unhandled exception.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..errors import BackendError, EdgeSDKError, InputError, MissingDependencyError
from .metrics import DaemonMetrics
from .models import ModelTable, ServedModel
from .pipeline import Pipelines

log = logging.getLogger(__name__)

#: (model name, inputs, outputs, seconds) after every successful inference
InferHook = Callable[[str, dict[str, np.ndarray] | None, dict[str, np.ndarray], float], None]

# KServe v2 datatypes <-> numpy.
_V2_TO_NP: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NP_TO_V2 = {v: k for k, v in _V2_TO_NP.items()}


class RequestError(EdgeSDKError):
    """A client request is malformed; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def v2_datatype(dtype: str | np.dtype) -> str:
    try:
        return _NP_TO_V2[np.dtype(dtype)]
    except (KeyError, TypeError):
        return str(dtype).upper()


def _shape_out(shape: list[int | str | None]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


@dataclass
class ApiState:
    """What the HTTP handlers read: the model table, metrics and the daemon's lifecycle flags."""

    models: ModelTable
    metrics: DaemonMetrics
    max_body_bytes: int = 16 * 1024 * 1024
    max_concurrent_infer: int = 4
    draining: bool = False
    started: bool = False
    in_flight: int = 0
    running: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    #: Called after every successful inference (model name, inputs, outputs, seconds).
    on_infer: InferHook | None = None
    #: The daemon's sensor pipelines, if any.
    pipelines: Pipelines | None = None

    def enter(self) -> bool:
        """Count a call from its first byte (so a slow upload is drained too); False when draining."""
        with self._cond:
            if self.draining:
                return False
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            return True

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            self._cond.notify_all()

    def start_run(self) -> bool:
        """Take one of ``max_concurrent_infer`` call slots; False when all are busy.

        Taken before the body is read, so at most ``max_concurrent_infer`` bodies (each up to
        ``max_body_bytes``) are held and parsed at once: memory stays bounded under load.
        """
        with self._cond:
            if self.running >= self.max_concurrent_infer:
                return False
            self.running += 1
            return True

    def end_run(self) -> None:
        with self._cond:
            self.running -= 1

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to ``timeout`` s for in-flight ones; True if all finished."""
        with self._cond:
            self.draining = True
            return self._cond.wait_for(lambda: self.in_flight == 0, timeout=timeout)

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


# ---- request parsing -----------------------------------------------------------------------------

def _tensor_from_json(item: Any, index: int, binary: memoryview | None, offset: int) -> tuple[str, np.ndarray, int]:
    """One ``inputs[i]`` object → (name, array, bytes of the binary section consumed)."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise RequestError(400, f"{where}: expected an object with name, shape, datatype, data")
    unknown = set(item) - {"name", "shape", "datatype", "data", "parameters"}
    if unknown:
        raise RequestError(400, f"{where}: unknown keys {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(400, f"{where}: 'name' must be a non-empty string")
    where = f"input {name!r}"
    shape = item.get("shape")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise RequestError(400, f"{where}: 'shape' must be a list of at most 16 non-negative integers, got {shape!r}")
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype == "BYTES" or datatype not in _V2_TO_NP:
        raise RequestError(400, f"{where}: unsupported datatype {datatype!r} (use one of {sorted(_V2_TO_NP)})")
    dtype = _V2_TO_NP[datatype]
    count = math.prod(shape)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"{where}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if binary is None:
            raise RequestError(400, f"{where}: binary_data_size given but the request has no binary section "
                               "(send the Inference-Header-Content-Length header)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise RequestError(400, f"{where}: binary_data_size {size!r} runs past the {len(binary)}-byte binary section")
        if size != count * dtype.itemsize:
            raise RequestError(400, f"{where}: binary_data_size {size} != {count} elements x {dtype.itemsize} bytes for shape {shape}")
        array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape).copy()
        return name, array, size
    if "data" not in item:
        raise RequestError(400, f"{where}: 'data' is missing")
    data = item["data"]
    if not isinstance(data, list):
        raise RequestError(400, f"{where}: 'data' must be a (flat or nested) list of numbers")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(400, f"{where}: 'data' is not a regular list of {datatype} numbers: {exc}") from None
    if array.size != count:
        raise RequestError(400, f"{where}: 'data' has {array.size} elements but shape {shape} needs {count}")
    return name, array.reshape(shape), 0


def _split_body(body: bytes, header_length: int | None, expected: str) -> tuple[dict[str, Any], memoryview | None]:
    """(JSON header object, binary section or None) of a request, per the binary-data extension."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length} is outside the {len(body)}-byte body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, None
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[…" nested deeper than the parser's stack
        raise RequestError(400, "request body is nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"request body must be a JSON object with {expected}")
    return request, binary


def parse_infer_request(body: bytes, header_length: int | None) -> tuple[dict[str, np.ndarray], list[str] | None, Any, set[str]]:
    """Request body → (inputs, requested output names or None, request id, outputs wanted binary)."""
    request, binary = _split_body(body, header_length, "an 'inputs' list")
    unknown = set(request) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise RequestError(400, f"unknown request keys {sorted(unknown)}")
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise RequestError(400, "'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        name, array, used = _tensor_from_json(item, i, binary, offset)
        if name in inputs:
            raise RequestError(400, f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if binary is not None and offset != len(binary):
        raise RequestError(400, f"binary section has {len(binary)} bytes but the inputs use {offset}")
    wanted, binary_out = None, set()
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise RequestError(400, "'outputs' must be a list of objects with a 'name'")
        wanted = [o["name"] for o in outputs]
        binary_out = {o["name"] for o in outputs if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")}
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "'id' must be a string")
    return inputs, wanted, request_id, binary_out


MAX_PUSH_SAMPLES = 100_000


def parse_stream_push(body: bytes, header_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``{"ts": [...], "shape": [N, ...], "datatype", "data"|parameters.binary_data_size}`` → (ts, samples)."""
    request, binary = _split_body(body, header_length, "ts, shape, datatype and data")
    ts = request.pop("ts", None)
    if not isinstance(ts, list) or not ts or len(ts) > MAX_PUSH_SAMPLES:
        raise RequestError(400, f"'ts' must be a non-empty list of at most {MAX_PUSH_SAMPLES} timestamps (seconds)")
    try:
        stamps = np.asarray(ts, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise RequestError(400, f"'ts' must be numbers: {exc}") from None
    if stamps.ndim != 1 or not np.isfinite(stamps).all():
        raise RequestError(400, "'ts' must be a flat list of finite numbers")
    request.setdefault("name", "samples")
    _, samples, used = _tensor_from_json(request, 0, binary, 0)
    if binary is not None and used != len(binary):
        raise RequestError(400, f"binary section has {len(binary)} bytes but the samples use {used}")
    if samples.ndim < 1 or samples.shape[0] != stamps.size:
        raise RequestError(400, f"'shape' must start with the number of samples ({stamps.size}), got {list(samples.shape)}")
    return stamps, samples


def _check_against(served: ServedModel, inputs: dict[str, np.ndarray]) -> None:
    """Name/dtype/shape check against the signature, before any native code runs."""
    from ..runtime.backends.base import check_inputs

    try:
        check_inputs(served.inputs, inputs)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None


# ---- the Starlette app ---------------------------------------------------------------------------

def create_app(state: ApiState):
    """The ASGI app serving ``state``."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError("starlette", "daemon", "The daemon's HTTP API") from None

    metrics = state.metrics

    def error(status: int, message: str, route: str) -> JSONResponse:
        metrics.requests.labels(route, str(status)).inc()
        return JSONResponse({"error": message}, status_code=status)

    def ok(payload: Any, route: str, status: int = 200) -> JSONResponse:
        metrics.requests.labels(route, str(status)).inc()
        return JSONResponse(payload, status_code=status)

    async def server_meta(request: Request) -> Response:
        return ok({"name": "edge-sdk", "version": __version__, "extensions": ["binary_tensor_data"]}, "meta")

    async def live(request: Request) -> Response:
        return ok({"live": True}, "live")

    async def ready(request: Request) -> Response:
        is_ready, problems = state.ready()
        return ok({"ready": is_ready, **({"problems": problems} if problems else {})}, "ready", 200 if is_ready else 503)

    def model_label(name: str) -> str:
        # Metric labels only for configured models: a client sending random names must not be
        # able to grow the metrics registry without bound.
        return name if name in state.models.names() else "_unknown"

    def lookup(name: str, route: str) -> ServedModel | JSONResponse:
        served = state.models.get(name)
        if served is None:
            if name in state.models.names():
                return error(503, f"model {name!r} is not loaded: {state.models.error(name) or 'loading'}", route)
            return error(404, f"unknown model {name!r}; served: {state.models.names()}", route)
        return served

    async def model_meta(request: Request) -> Response:
        served = lookup(request.path_params["name"], "model_meta")
        if isinstance(served, Response):
            return served
        info = served.info()
        backend, precision = served.backend_precision()
        return ok({
            "name": served.name,
            "versions": [str(served.version)],
            "platform": backend,
            "inputs": [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": _shape_out(s.shape)} for s in served.inputs],
            "outputs": [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": _shape_out(s.shape)} for s in served.outputs],
            "parameters": {"backend": backend, "precision": precision, "release_version": served.version,
                           "variant": info.variant if info is not None else None, "release_dir": str(served.release_dir)},
        }, "model_meta")

    async def model_ready(request: Request) -> Response:
        served = lookup(request.path_params["name"], "model_ready")
        if isinstance(served, Response):
            return served
        is_ready = not state.draining
        return ok({"name": served.name, "ready": is_ready}, "model_ready", 200 if is_ready else 503)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise RequestError(400, f"bad Content-Length {declared!r}") from None
            if n > state.max_body_bytes:
                raise RequestError(413, f"request body of {n} bytes exceeds the {state.max_body_bytes}-byte limit")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > state.max_body_bytes:  # chunked uploads have no Content-Length: count as we go
                raise RequestError(413, f"request body exceeds the {state.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request) -> Response:
        name = request.path_params["name"]
        route = "infer"
        if not state.enter():
            metrics.infer_errors.labels(model_label(name), "unavailable").inc()
            return error(503, "the daemon is shutting down", route)
        try:
            if not state.start_run():
                metrics.infer_errors.labels(model_label(name), "busy").inc()
                return error(503, f"too many concurrent calls (limit {state.max_concurrent_infer}); retry", route)
            try:
                return await _infer(request, name, route)
            finally:
                state.end_run()
        finally:
            state.leave()

    async def _infer(request: Request, name: str, route: str) -> Response:
        label = model_label(name)
        try:
            body = await read_body(request)
            header = request.headers.get("inference-header-content-length")
            try:
                header_length = int(header) if header is not None else None
            except ValueError:
                raise RequestError(400, f"bad Inference-Header-Content-Length {header!r}") from None
            # Parsing megabytes of JSON takes a while: off the event loop, so health checks,
            # metrics and other calls keep being answered meanwhile.
            inputs, wanted, request_id, binary_out = await run_in_threadpool(parse_infer_request, body, header_length)
        except RequestError as exc:
            metrics.infer_errors.labels(label, "bad_request").inc()
            return error(exc.status, str(exc), route)
        except ClientDisconnect:
            return error(400, "client disconnected", route)
        served = state.models.checkout(name)
        if served is None:
            metrics.infer_errors.labels(label, "unknown_model").inc()
            found = lookup(name, route)
            return found if isinstance(found, Response) else error(503, "model swapped out", route)
        try:
            _check_against(served, inputs)
            if wanted is not None:
                known = [s.name for s in served.outputs]
                bad = [w for w in wanted if w not in known]
                if bad:
                    raise RequestError(400, f"unknown outputs {bad}; the model has {known}")
            backend, precision = served.backend_precision()
            started = time.perf_counter()
            outputs = await run_in_threadpool(served.run, inputs)
            elapsed = time.perf_counter() - started
            version = served.version
        except RequestError as exc:
            metrics.infer_errors.labels(label, "bad_request").inc()
            return error(exc.status, str(exc), route)
        except InputError as exc:
            metrics.infer_errors.labels(label, "bad_input").inc()
            return error(400, str(exc), route)
        except BackendError as exc:
            metrics.infer_errors.labels(label, "backend").inc()
            log.error("model %s: inference failed: %s", name, exc)
            return error(500, f"inference failed: {exc}", route)
        except Exception as exc:  # the daemon keeps serving whatever one call did
            metrics.infer_errors.labels(label, "internal").inc()
            log.exception("model %s: unexpected inference error", name)
            return error(500, f"internal error: {type(exc).__name__}: {exc}", route)
        finally:
            served.release()
        metrics.infer_latency.labels(name, backend, precision).observe(elapsed)
        if state.on_infer is not None:
            try:
                state.on_infer(name, inputs, outputs, elapsed)
            except Exception:  # telemetry hooks must not fail the call
                log.exception("on_infer hook failed")
        names = wanted if wanted is not None else list(outputs)
        result: dict[str, Any] = {"model_name": name, "model_version": str(version), "outputs": []}
        if request_id is not None:
            result["id"] = request_id
        blobs = []
        for out_name in names:
            array = np.asarray(outputs[out_name])
            entry: dict[str, Any] = {"name": out_name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
            if out_name in binary_out:
                raw = np.ascontiguousarray(array).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = array.ravel().tolist()
            result["outputs"].append(entry)
        metrics.requests.labels(route, "200").inc()
        if not blobs:
            return JSONResponse(result)
        head = json.dumps(result, separators=(",", ":")).encode()
        return Response(head + b"".join(blobs), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    async def pipeline_push(request: Request) -> Response:
        route = "pipeline_push"
        model, stream = request.path_params["name"], request.path_params["stream"]
        pipeline = state.pipelines.get(model) if state.pipelines is not None else None
        if pipeline is None:
            return error(404, f"no pipeline for model {model!r}", route)
        if not state.enter():
            return error(503, "the daemon is shutting down", route)
        try:
            body = await read_body(request)
            header = request.headers.get("inference-header-content-length")
            try:
                header_length = int(header) if header is not None else None
            except ValueError:
                raise RequestError(400, f"bad Inference-Header-Content-Length {header!r}") from None
            stamps, samples = await run_in_threadpool(parse_stream_push, body, header_length)
            counts = await run_in_threadpool(pipeline.push, stream, stamps, samples)
        except RequestError as exc:
            return error(exc.status, str(exc), route)
        except ClientDisconnect:
            return error(400, "client disconnected", route)
        except EdgeSDKError as exc:  # AlignError: unknown stream, bad timestamps
            return error(400, str(exc), route)
        finally:
            state.leave()
        return ok(counts, route)

    async def pipeline_status(request: Request) -> Response:
        model = request.path_params["name"]
        pipeline = state.pipelines.get(model) if state.pipelines is not None else None
        if pipeline is None:
            return error(404, f"no pipeline for model {model!r}", "pipeline_status")
        return ok(pipeline.status(), "pipeline_status")

    async def metrics_route(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type.split(";")[0], headers={"Content-Type": content_type})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}", "other")

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}", "other")

    routes = [
        Route("/v2", server_meta, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", model_meta, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/pipelines/{name}", pipeline_status, methods=["GET"]),
        Route("/v2/pipelines/{name}/streams/{stream}", pipeline_push, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: internal})
