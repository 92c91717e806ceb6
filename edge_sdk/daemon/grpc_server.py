"""The local inference API over gRPC: KServe v2's ``inference.GRPCInferenceService`` (Triton's
superset: model config and the repository calls), on the daemon's event loop beside HTTP.

Requests become :class:`~.kserve.InferRequest` through the same tensor decoding as HTTP, results
are written from the same :class:`~.kserve.InferResult`, and every call goes through the same
:class:`~.api.InferenceApi` (authentication, queue, memory budget, metrics). Needs ``grpcio``
(the ``daemon`` extra), imported when the listener starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from .api import InferenceApi
from .auth import Authenticator
from .http import Listener
from .kserve import BYTES, ApiError, InferRequest, InferResult, bad, check_datatype, check_repository_parameters, \
    check_shape, decode_tensor, raw_bytes, requested_output, v2_datatype

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"

# Typed contents field per datatype (FP16 has none: it travels as raw contents only).
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents"}


def _grpc():
    try:
        import grpc
        from grpc import aio
    except ImportError:  # pragma: no cover - depends on the install
        raise MissingDependencyError("grpcio", "daemon", "The daemon's gRPC API") from None
    return grpc, aio


def _params(entries: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values."""
    out = {}
    for key, value in entries.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def infer_request_from_proto(msg: Any) -> InferRequest:
    """A ``ModelInferRequest`` → :class:`InferRequest` (raw or typed contents)."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise bad(f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs (one per input, or none)")
    if not msg.inputs:
        raise bad("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        if not tensor.name:
            raise bad(f"inputs[{i}]: 'name' must be a non-empty string")
        where = f"input {tensor.name!r}"
        shape = check_shape(list(tensor.shape), where)
        datatype = check_datatype(tensor.datatype, where)
        if tensor.name in inputs:
            raise bad(f"input {tensor.name!r} is given twice")
        if raw:
            if tensor.HasField("contents"):
                raise bad(f"{where}: both raw_input_contents and contents given")
            inputs[tensor.name] = decode_tensor(where, shape, datatype, raw=raw[i])
            continue
        field = _CONTENTS.get(datatype)
        if field is None:
            raise bad(f"{where}: datatype {datatype} travels only as raw_input_contents")
        inputs[tensor.name] = decode_tensor(where, shape, datatype, values=getattr(tensor.contents, field))
    outputs = [requested_output(o.name, _params(o.parameters), f"outputs[{i}]") for i, o in enumerate(msg.outputs)]
    return InferRequest(inputs, outputs or None, msg.id or None)


def result_to_proto(result: InferResult, pb: Any) -> Any:
    """An :class:`InferResult` → ``ModelInferResponse``, every output as raw contents (as Triton does)."""
    response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=result.id or "")
    for name, array in result.outputs:
        response.outputs.add(name=name, datatype=v2_datatype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(raw_bytes(array))
    return response


class GrpcServer:
    """The gRPC listener of one daemon; :meth:`start` binds, :meth:`stop` drains it."""

    def __init__(self, api: InferenceApi, auth: Authenticator, listener: Listener, address: str,
                 credentials: Any = None) -> None:
        self.api, self.auth, self.listener = api, auth, listener
        self.address, self.credentials = address, credentials
        self.port: int | None = None
        self._server: Any = None

    async def start(self) -> int:
        grpc, aio = _grpc()
        from .proto import kserve_pb2 as pb

        config = self.api.config
        limit = config.max_body_bytes
        options = [
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", max(limit, 64 << 20)),
            ("grpc.server_handshake_timeout_ms", int(config.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", 300_000), ("grpc.so_reuseport", 0),
        ]
        # Calls beyond the queue are refused by the Admission with UNAVAILABLE; this only bounds
        # what grpc core holds in memory (each call up to max_body_bytes).
        self._server = aio.server(options=options,
                                  maximum_concurrent_rpcs=config.max_concurrent_infer + config.max_queue + 16)
        methods = {
            "ServerLive": (self._live, pb.ServerLiveRequest, False),
            "ServerReady": (self._ready, pb.ServerReadyRequest, False),
            "ModelReady": (self._model_ready, pb.ModelReadyRequest, True),
            "ServerMetadata": (self._server_meta, pb.ServerMetadataRequest, True),
            "ModelMetadata": (self._model_meta, pb.ModelMetadataRequest, True),
            "ModelConfig": (self._model_config, pb.ModelConfigRequest, True),
            "ModelInfer": (self._infer, pb.ModelInferRequest, True),
            "RepositoryIndex": (self._index, pb.RepositoryIndexRequest, True),
            "RepositoryModelLoad": (self._load, pb.RepositoryModelLoadRequest, True),
            "RepositoryModelUnload": (self._unload, pb.RepositoryModelUnloadRequest, True),
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            self._wrap(name, fn, authenticate, pb), request_deserializer=request.FromString,
            response_serializer=lambda m: m.SerializeToString()) for name, (fn, request, authenticate) in methods.items()}
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        if self.credentials is not None:
            self.port = self._server.add_secure_port(self.address, self.credentials)
        else:
            self.port = self._server.add_insecure_port(self.address)
        await self._server.start()
        return self.port

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)

    def _wrap(self, method: str, fn: Callable[..., Awaitable[Any]], authenticate: bool, pb: Any):
        grpc, _ = _grpc()
        metrics = self.api.metrics

        async def handler(request: Any, context: Any) -> Any:
            try:
                if authenticate:
                    metadata = dict(context.invocation_metadata() or ())
                    self.auth.check(metadata.get("authorization"), loopback=self.listener.loopback,
                                    transport_authenticated=self.listener.transport_authenticated)
                response = await fn(request, pb)
            except ApiError as exc:
                metrics.grpc_requests.labels(method, exc.status.grpc).inc()
                if exc.retry_after is not None:
                    context.set_trailing_metadata((("retry-after", str(int(exc.retry_after))),))
                await context.abort(getattr(grpc.StatusCode, exc.status.grpc), str(exc))
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                log.exception("gRPC %s: unexpected error", method)
                metrics.grpc_requests.labels(method, "INTERNAL").inc()
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            metrics.grpc_requests.labels(method, "OK").inc()
            return response

        return handler

    # ---- methods ------------------------------------------------------------------------------

    async def _live(self, request: Any, pb: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self, request: Any, pb: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.api.ready()[0])

    async def _model_ready(self, request: Any, pb: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.api.model_ready(request.name, request.version or None))

    async def _server_meta(self, request: Any, pb: Any) -> Any:
        return pb.ServerMetadataResponse(**self.api.server_metadata())

    async def _model_meta(self, request: Any, pb: Any) -> Any:
        meta = self.api.model_metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=meta["inputs"], outputs=meta["outputs"])

    async def _model_config(self, request: Any, pb: Any) -> Any:
        from google.protobuf import json_format

        config = self.api.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def _infer(self, request: Any, pb: Any) -> Any:
        api = self.api
        api.enter()
        held = 0
        try:
            parsed = infer_request_from_proto(request)
            # (not request.ByteSize(): upb computes it by serializing the whole message again)
            held = api.budget.reserve(sum(array.nbytes for array in parsed.inputs.values()))
            result = await api.infer(request.model_name, request.model_version or None, parsed)
        finally:
            api.budget.free(held)
            api.leave()
        return result_to_proto(result, pb)

    async def _index(self, request: Any, pb: Any) -> Any:
        rows = self.api.repository.index(request.ready)
        return pb.RepositoryIndexResponse(models=rows)

    async def _load(self, request: Any, pb: Any) -> Any:
        check_repository_parameters(dict(request.parameters))
        await self.api.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def _unload(self, request: Any, pb: Any) -> Any:
        check_repository_parameters(dict(request.parameters))
        self.api.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def server_credentials(tls: Any) -> Any:
    """gRPC TLS credentials from the listener's ``tls`` config (client certificates required with client_ca)."""
    grpc, _ = _grpc()
    from ..errors import ConfigError

    try:
        cert = tls.cert.read_bytes()
        key = tls.key.read_bytes() if tls.key is not None else cert
        ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    except OSError as exc:
        raise ConfigError(f"grpc.tls: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

