"""The local inference API over HTTP: the Open Inference Protocol (KServe v2), plus ``/metrics``.

Routes (``/versions/{v}`` may follow ``/v2/models/{name}`` in every model route; without it the
active release is meant): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}``, ``…/ready``, ``…/config``, ``POST …/infer`` (JSON tensors, the binary
tensor extension, the classification extension), ``POST /v2/repository/index``,
``/v2/repository/models/{name}/load|unload``, ``GET /metrics``; beyond KServe,
``POST /v2/pipelines/{model}/streams/{stream}`` pushes timestamped sensor samples into the
daemon's aligner (see :mod:`.pipeline`) and ``GET /v2/pipelines/{model}`` reports it.

Request bodies may be ``Content-Encoding: gzip``/``deflate``; responses are compressed when the
client's ``Accept-Encoding`` asks. A body is read (within ``api.body_timeout_s``, inflated size
within ``api.max_body_bytes``) and decoded as it arrives before an inference slot is taken.
Anything malformed gets a 4xx with ``{"error": "..."}``; nothing a client sends escapes as an
unhandled exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import EdgeSDKError, MissingDependencyError
from .api import InferenceApi
from .auth import Authenticator
from .kserve import ApiError, BodyDecoder, Status, bad, check_repository_parameters, infer_request_from_json, \
    result_to_http, split_header, stream_push_from_json

log = logging.getLogger(__name__)

#: Responses smaller than this are sent uncompressed whatever Accept-Encoding says.
_COMPRESS_MIN = 1024
_INFLATE_STEP = 1 << 16

if hasattr(asyncio, "timeout_at"):  # Python 3.11+: one deadline for the whole body
    _deadline = asyncio.timeout_at

    def _receive_by(request, deadline: float):
        return request.receive()
else:  # pragma: no cover - Python 3.10: a timeout per receive
    _deadline = contextlib.nullcontext

    def _receive_by(request, deadline: float):
        return asyncio.wait_for(request.receive(), max(deadline - asyncio.get_running_loop().time(), 0.001))


@dataclass(frozen=True)
class Listener:
    """How the connection reached us: decides what authentication it still needs."""

    loopback: bool  # a loopback TCP address (browsers on this device can reach it)
    transport_authenticated: bool  # the Unix socket, or TLS with a required client certificate


class _Inflater:
    """``Content-Encoding`` of a request body, inflated in bounded steps."""

    def __init__(self, encoding: str | None) -> None:
        encoding = (encoding or "identity").strip().lower()
        if encoding == "gzip":
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()  # zlib-wrapped, as HTTP's "deflate" is
        elif encoding == "identity":
            self._z = None
        else:
            raise ApiError(Status.UNSUPPORTED_MEDIA, f"Content-Encoding {encoding!r} is not supported "
                                                     "(use gzip, deflate or none)")

    def inflate(self, data: bytes, final: bool = False):
        if self._z is None:
            if data:
                yield data
            return
        try:
            while data:
                out = self._z.decompress(data, _INFLATE_STEP)
                data = self._z.unconsumed_tail
                if out:
                    yield out
            if final:
                tail = self._z.flush()
                if tail:
                    yield tail
                if not self._z.eof:
                    raise bad("the compressed request body is truncated")
        except zlib.error as exc:
            raise bad(f"the request body does not inflate: {exc}") from None


def _compress(body: bytes, accept: str | None) -> tuple[bytes, str | None]:
    if len(body) < _COMPRESS_MIN or not accept:
        return body, None
    offered = {part.split(";")[0].strip().lower(): part for part in accept.split(",")}
    for encoding in ("gzip", "deflate"):
        if encoding in offered and "q=0" not in offered[encoding].replace(" ", ""):
            return (gzip.compress(body, compresslevel=1) if encoding == "gzip" else zlib.compress(body, 1)), encoding
    return body, None


def create_app(api: InferenceApi, auth: Authenticator, listener: Listener):
    """The ASGI app serving ``api`` on one listener."""
    try:
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import Response
        from starlette.routing import Route
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError("starlette", "daemon", "The daemon's HTTP API") from None

    metrics, config = api.metrics, api.config

    def respond(request: Request, body: bytes, route: str, status: int = 200,
                headers: dict[str, str] | None = None) -> Response:
        metrics.requests.labels(route, str(status)).inc()
        headers = dict(headers or {"Content-Type": "application/json"})
        body, encoding = _compress(body, request.headers.get("accept-encoding"))
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        headers["Vary"] = "Accept-Encoding"
        return Response(body, status_code=status, headers=headers)

    def ok(request: Request, payload: Any, route: str, status: int = 200) -> Response:
        return respond(request, json.dumps(payload, separators=(",", ":")).encode(), route, status)

    def error(request: Request, exc: ApiError, route: str) -> Response:
        headers = {"Content-Type": "application/json"}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(int(exc.retry_after))
        if exc.status is Status.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = 'Bearer realm="edge-sdk"'
        if exc.status in (Status.TIMEOUT, Status.TOO_LARGE):
            headers["Connection"] = "close"  # the rest of the body is not read
        return respond(request, json.dumps({"error": str(exc)}).encode(), route, exc.status.http, headers)

    def guard(request: Request, *, authenticate: bool = True) -> None:
        auth.check_browser(request.headers.get("origin"), request.headers.get("sec-fetch-site"),
                           request.headers.get("host"), listener.loopback)
        if authenticate:
            auth.check(request.headers.get("authorization"), transport_authenticated=listener.transport_authenticated,
                       loopback=listener.loopback)

    def route(name: str, *, authenticate: bool = True):
        """A handler with the browser and auth checks, and ApiError → its status."""

        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    guard(request, authenticate=authenticate)
                    return await handler(request)
                except ApiError as exc:
                    return error(request, exc, name)
                except ClientDisconnect:
                    return error(request, bad("client disconnected"), name)
            return endpoint
        return wrap

    def version_of(request: Request) -> str | None:
        return request.path_params.get("version")

    async def read_body(request: Request, sink) -> None:
        """Feed the (inflated) body to ``sink`` as it arrives, within the size cap and the body timeout."""
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise bad(f"bad Content-Length {declared!r}") from None
            if n > config.max_body_bytes:
                raise ApiError(Status.TOO_LARGE, f"request body of {n} bytes exceeds the {config.max_body_bytes}-byte limit")
        inflater = _Inflater(request.headers.get("content-encoding"))
        deadline = asyncio.get_running_loop().time() + config.body_timeout_s
        received = inflated = 0
        more = True
        try:
            async with _deadline(deadline):
                while more:
                    message = await _receive_by(request, deadline)
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk, more = message.get("body", b""), message.get("more_body", False)
                    received += len(chunk)
                    if received > config.max_body_bytes:  # chunked uploads have no Content-Length: count as we go
                        raise ApiError(Status.TOO_LARGE, f"request body exceeds the {config.max_body_bytes}-byte limit")
                    # Decoded here, on the loop: a thread hand-off per chunk cost more than it freed
                    # (the decoder holds the GIL), and a chunk is at most a few ms of work.
                    for piece in inflater.inflate(chunk, final=not more):
                        inflated += len(piece)
                        if inflated > config.max_body_bytes:
                            raise ApiError(Status.TOO_LARGE,
                                           f"the request body inflates past the {config.max_body_bytes}-byte limit")
                        sink(piece)
        except asyncio.TimeoutError:
            metrics.timeouts.labels("body").inc()
            raise ApiError(Status.TIMEOUT, f"the request body did not arrive within {config.body_timeout_s:g}s "
                                           "(api.body_timeout_s)") from None

    async def decoded(request: Request, held: list[int]) -> tuple[Any, Any]:
        """(JSON header, binary section) of the body; reserved tensor bytes added to ``held``."""

        def reserve(nbytes: int) -> int:
            held[0] += api.budget.reserve(nbytes)
            return nbytes

        length = request.headers.get("content-length")
        identity = request.headers.get("content-encoding") in (None, "identity")
        size = int(length) if identity and length is not None and length.isdigit() else None
        header = split_header(request.headers.get("inference-header-content-length"), size)
        decoder = BodyDecoder(header, config.max_body_bytes, reserve, size)
        await read_body(request, decoder.feed)
        return decoder.finish()

    # ---- routes ---------------------------------------------------------------------------------

    @route("meta")
    async def server_meta(request: Request) -> Response:
        return ok(request, api.server_metadata(), "meta")

    @route("live", authenticate=False)
    async def live(request: Request) -> Response:
        return ok(request, {"live": True}, "live")

    @route("ready", authenticate=False)
    async def ready(request: Request) -> Response:
        is_ready, problems = api.ready()
        payload: dict[str, Any] = {"ready": is_ready}
        if problems:
            try:  # what is wrong (paths, errors) only for callers who may know
                guard(request)
                payload["problems"] = problems
            except ApiError:
                pass
        return ok(request, payload, "ready", 200 if is_ready else 503)

    @route("model_meta")
    async def model_meta(request: Request) -> Response:
        return ok(request, api.model_metadata(request.path_params["name"], version_of(request)), "model_meta")

    @route("model_config")
    async def model_config(request: Request) -> Response:
        return ok(request, api.model_config(request.path_params["name"], version_of(request)), "model_config")

    @route("model_ready")
    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        is_ready = api.model_ready(name, version_of(request))
        return ok(request, {"name": name, "ready": is_ready}, "model_ready", 200 if is_ready else 503)

    @route("infer")
    async def infer(request: Request) -> Response:
        name = request.path_params["name"]
        api.enter()
        held = [0]
        try:
            try:
                document, binary = await decoded(request, held)
                parsed = infer_request_from_json(document, binary)
            except ApiError as exc:
                reason = "busy" if exc.status is Status.UNAVAILABLE else "bad_request"
                metrics.infer_errors.labels(api.label(name), reason).inc()
                raise
            result = await api.infer(name, version_of(request), parsed)
        finally:
            api.budget.free(held[0])
            api.leave()
        body, headers = result_to_http(result)
        return respond(request, body, "infer", 200, headers)

    @route("repository")
    async def repository_index(request: Request) -> Response:
        held = [0]
        document, _ = await decoded(request, held) if request.headers.get("content-length") not in (None, "0") \
            else ({}, None)
        ready_only = document.get("ready", False) if isinstance(document, dict) else False
        if not isinstance(ready_only, bool):
            raise bad("'ready' must be true or false")
        return ok(request, api.repository.index(ready_only), "repository")

    async def _repository_params(request: Request) -> None:
        held = [0]
        if request.headers.get("content-length") in (None, "0"):
            return
        document, _ = await decoded(request, held)
        params = document.get("parameters") if isinstance(document, dict) else None
        check_repository_parameters(params or {})

    @route("repository")
    async def repository_load(request: Request) -> Response:
        await _repository_params(request)
        await api.repository.load(request.path_params["name"])
        return ok(request, {}, "repository")

    @route("repository")
    async def repository_unload(request: Request) -> Response:
        await _repository_params(request)
        api.repository.unload(request.path_params["name"])
        return ok(request, {}, "repository")

    @route("pipeline_push")
    async def pipeline_push(request: Request) -> Response:
        model, stream = request.path_params["name"], request.path_params["stream"]
        pipeline = api.pipelines.get(model) if api.pipelines is not None else None
        if pipeline is None:
            raise ApiError(Status.NOT_FOUND, f"no pipeline for model {model!r}")
        api.enter()
        held = [0]
        try:
            document, binary = await decoded(request, held)
            stamps, samples = await asyncio.to_thread(stream_push_from_json, document, binary)
            try:
                counts = await asyncio.to_thread(pipeline.push, stream, stamps, samples)
            except EdgeSDKError as exc:  # AlignError: unknown stream, bad timestamps
                raise bad(str(exc)) from None
        finally:
            api.budget.free(held[0])
            api.leave()
        return ok(request, counts, "pipeline_push")

    @route("pipeline_status")
    async def pipeline_status(request: Request) -> Response:
        model = request.path_params["name"]
        pipeline = api.pipelines.get(model) if api.pipelines is not None else None
        if pipeline is None:
            raise ApiError(Status.NOT_FOUND, f"no pipeline for model {model!r}")
        return ok(request, pipeline.status(), "pipeline_status")

    async def metrics_route(request: Request) -> Response:
        try:
            guard(request, authenticate=config.auth.metrics.value == "token")
        except ApiError as exc:
            return error(request, exc, "metrics")
        body, content_type = metrics.render()
        return respond(request, body, "metrics", 200, {"Content-Type": content_type})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}"
        return error(request, ApiError(Status.NOT_FOUND if status == 404 else Status.INVALID_ARGUMENT, message), "other") \
            if status in (404, 400) else respond(request, json.dumps({"error": message}).encode(), "other", status)

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(request, ApiError(Status.INTERNAL, f"internal error: {type(exc).__name__}"), "other")

    routes = [
        Route("/v2", server_meta, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
        Route("/v2/pipelines/{name}", pipeline_status, methods=["GET"]),
        Route("/v2/pipelines/{name}/streams/{stream}", pipeline_push, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, model_meta, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/config", model_config, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: internal})


#: After answering a request whose body is still coming (408, 413, 401 …), the connection sends its
#: FIN and discards what the client still sends for up to this long (this long between two reads at
#: most), as nginx's lingering close: closing at once would make the kernel answer the unread bytes
#: with a reset, and a client still writing its body then loses the response.
_LINGER_S = 10.0
_LINGER_IDLE_S = 2.0


class _LingeringTransport:
    """The transport as uvicorn's protocol sees it: ``close()`` lingers when the request body is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._transport, self._protocol = transport, protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        cycle = self._protocol.cycle
        if cycle is None or not cycle.more_body or self._transport.is_closing():
            self._transport.close()
            return
        if self._transport.can_write_eof():  # (TLS cannot: the response's length tells the end)
            self._transport.write_eof()
        self._protocol.linger()


def protocol_class(header_timeout_s: float, max_connections: int, on_timeout=None):
    """uvicorn's HTTP protocol with the defences it lacks against starving clients, and a lingering close:

    * a connection must complete its request headers within ``header_timeout_s`` of connecting
      (or of its previous response), else it is closed: half-open and slowloris connections go;
    * beyond ``max_connections``, the connection idle longest (no request in progress) is closed
      to make room, so a flood of idle connections never locks out a new caller;
    * a response sent before its request's body was read reaches the client (:data:`_LINGER_S`).
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _idle_since: float = 0.0
        _linger_until: float | None = None
        _linger_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            self._raw = transport
            super().connection_made(_LingeringTransport(transport, self))
            self._arm()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and getattr(c, "_idle_since", None)
                        and (c.cycle is None or c.cycle.response_complete)]
                if idle:
                    min(idle, key=lambda c: c._idle_since).transport.close()
                else:
                    transport.close()

        def data_received(self, data: bytes) -> None:
            if self._linger_until is not None:  # the rest of an answered request: dropped
                self._linger_step()
                return
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are complete
                self._disarm()
                self._idle_since = 0.0

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            if self._linger_until is not None:  # the server stops: no more waiting for the rest of a body
                self._raw.close()
                return
            super().shutdown()

        def linger(self) -> None:
            self._disarm()
            self._linger_until = self.loop.time() + _LINGER_S
            self._raw.resume_reading()  # (uvicorn pauses reading while a body waits to be consumed)
            self._linger_step()

        def _linger_step(self) -> None:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            when = min(self.loop.time() + _LINGER_IDLE_S, self._linger_until)
            self._linger_timer = self.loop.call_at(when, self._raw.close)

        def _arm(self) -> None:
            self._disarm()
            self._idle_since = time.monotonic()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                if on_timeout is not None:
                    on_timeout()
                self.transport.close()

    return GuardedProtocol
