"""The Open Inference Protocol (KServe v2) without its transports: one parser, one writer.

HTTP (:mod:`.http`) and gRPC (:mod:`.grpc_server`) both turn their wire form into an
:class:`InferRequest` here and write an :class:`InferResult` from here, so a behaviour (datatypes,
shape checks, BYTES, classification, non-finite floats, error codes) is implemented once.
Every refusal is an :class:`ApiError` carrying a transport-neutral :class:`Status`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EdgeSDKError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..manifest import Manifest, TensorSpec


class Status(Enum):
    """An outcome as HTTP status and gRPC status code name."""

    INVALID_ARGUMENT = (400, "INVALID_ARGUMENT")
    UNAUTHENTICATED = (401, "UNAUTHENTICATED")
    PERMISSION_DENIED = (403, "PERMISSION_DENIED")
    NOT_FOUND = (404, "NOT_FOUND")
    TIMEOUT = (408, "DEADLINE_EXCEEDED")
    TOO_LARGE = (413, "RESOURCE_EXHAUSTED")
    UNSUPPORTED_MEDIA = (415, "UNIMPLEMENTED")
    INTERNAL = (500, "INTERNAL")
    UNAVAILABLE = (503, "UNAVAILABLE")

    @property
    def http(self) -> int:
        return self.value[0]

    @property
    def grpc(self) -> str:
        return self.value[1]


class ApiError(EdgeSDKError):
    """A call refused or failed; ``retry_after`` (seconds) when trying again later will help."""

    def __init__(self, status: Status, message: str, retry_after: float | None = None) -> None:
        self.status, self.retry_after = status, retry_after
        super().__init__(message)


def bad(message: str) -> ApiError:
    return ApiError(Status.INVALID_ARGUMENT, message)


# ---- datatypes -----------------------------------------------------------------------------------

NUMERIC: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
BYTES = "BYTES"
DATATYPES = [*NUMERIC, BYTES]
_NP_TO_V2 = {v: k for k, v in NUMERIC.items()}
MAX_RANK = 16


def v2_datatype(dtype: str | np.dtype) -> str:
    """The KServe datatype of a numpy dtype (``object``/``str`` are BYTES)."""
    try:
        dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    except TypeError:
        return str(dtype).upper()
    found = _NP_TO_V2.get(dt)
    if found is not None:
        return found
    return BYTES if dt.kind in "OSU" else str(dtype).upper()


def check_shape(shape: Any, where: str) -> list[int]:
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise bad(f"{where}: 'shape' must be a list of at most {MAX_RANK} non-negative integers, got {shape!r}")
    return list(shape)


def check_datatype(datatype: Any, where: str) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise bad(f"{where}: unsupported datatype {datatype!r} (use one of {sorted(DATATYPES)})")
    return datatype


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor in the wire form of the binary extension and gRPC raw contents:
    each element as a 4-byte little-endian length and its bytes, row-major."""
    parts = []
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, count: int, where: str) -> np.ndarray:
    view, out, pos = memoryview(raw), np.empty(count, dtype=object), 0
    for i in range(count):
        if pos + 4 > len(view):
            raise bad(f"{where}: BYTES data ends after {i} of {count} elements")
        (size,) = struct.unpack_from("<I", view, pos)
        if pos + 4 + size > len(view):
            raise bad(f"{where}: BYTES element {i} of {size} bytes runs past the data")
        out[i] = bytes(view[pos + 4:pos + 4 + size])
        pos += 4 + size
    if pos != len(view):
        raise bad(f"{where}: {len(view) - pos} bytes left after the {count} BYTES elements")
    return out


def decode_tensor(where: str, shape: list[int], datatype: str, *, raw: bytes | memoryview | None = None,
                  values: Any = None) -> np.ndarray:
    """One input tensor from raw bytes (binary extension, gRPC raw contents) or from values
    (JSON ``data``, already an array when streamed; gRPC typed contents)."""
    count = math.prod(shape)
    if raw is not None:
        if datatype == BYTES:
            return deserialize_bytes(raw, count, where).reshape(shape)
        dtype = NUMERIC[datatype]
        if len(raw) != count * dtype.itemsize:
            raise bad(f"{where}: {len(raw)} bytes of data != {count} elements x {dtype.itemsize} bytes for shape {shape}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == BYTES:
        items = list(values)
        if len(items) != count:
            raise bad(f"{where}: 'data' has {len(items)} elements but shape {shape} needs {count}")
        array = np.empty(count, dtype=object)
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = item.encode()
            if not isinstance(item, bytes):
                raise bad(f"{where}: BYTES elements must be strings, element {i} is {type(item).__name__}")
            array[i] = item
        return array.reshape(shape)
    dtype = NUMERIC[datatype]
    if isinstance(values, np.ndarray):
        array = values
    else:
        if dtype.kind == "f" and isinstance(values, list) and None in values:
            raise bad(f"{where}: 'data' holds null; use NaN")
        try:
            array = np.asarray(values if isinstance(values, list) else list(values), dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad(f"{where}: 'data' is not a regular list of {datatype} numbers: {exc}") from None
    if array.size != count:
        raise bad(f"{where}: 'data' has {array.size} elements but shape {shape} needs {count}")
    return array.reshape(shape)


# ---- requests ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool = False
    class_count: int = 0  # > 0: the classification extension (top-k "score:index[:label]" strings)


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None  # None: every output
    id: str | None = None
    binary_output: bool = False  # request parameter binary_data_output (HTTP)


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"{where}: parameter {key!r} must be true or false")
    return value


def requested_output(name: Any, params: Any, where: str) -> RequestedOutput:
    if not isinstance(name, str) or not name:
        raise bad(f"{where}: 'name' must be a non-empty string")
    params = params or {}
    if not isinstance(params, dict):
        raise bad(f"output {name!r}: 'parameters' must be an object")
    count = params.get("classification", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise bad(f"output {name!r}: 'classification' must be a non-negative integer, got {count!r}")
    return RequestedOutput(name, _flag(params, "binary_data", f"output {name!r}"), count)


def json_plan(max_elements: int, reserve: Callable[[int], Any] | None = None):
    """The :class:`~.jsonstream.JsonStream` plan: decode each numeric input's ``data`` in bulk,
    preallocated from its shape (``reserve(nbytes)`` first), refusing a shape no body within the
    cap could fill."""

    def plan(obj: dict[str, Any], key: str) -> tuple[np.dtype, int | None] | None:
        if key == "ts":  # a stream push's timestamps
            return np.dtype(np.float64), None
        if key != "data":
            return None
        dtype = NUMERIC.get(obj.get("datatype")) if isinstance(obj.get("datatype"), str) else None
        if dtype is None:
            return None
        shape = obj.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            return dtype, None
        count = math.prod(shape)
        if count > max_elements:
            raise ApiError(Status.TOO_LARGE, f"input {obj.get('name')!r}: shape {shape} declares {count} elements, "
                                             f"more than a request body within the size limit can carry as JSON")
        if reserve is not None:
            reserve(count * dtype.itemsize)
        return dtype, count

    return plan


class BodyDecoder:
    """An HTTP request body fed in chunks, per the binary tensor extension: the first
    ``header_length`` bytes (all of them without it) are JSON, decoded as they arrive; the rest is
    the binary section, copied once into one buffer (sized up front when ``body_size``, the
    body's length before any inflating, is known). Memory stays near the tensors declared."""

    def __init__(self, header_length: int | None, max_body_bytes: int, reserve: Callable[[int], Any] | None = None,
                 body_size: int | None = None) -> None:
        from .jsonstream import WHOLE_MAX, JsonStream

        json_size = header_length if header_length is not None else body_size
        if reserve is not None and json_size is not None and json_size <= WHOLE_MAX:
            reserve(json_size)  # decoded at once (plain lists): it holds about its own size
        self._json = JsonStream(json_plan(max_body_bytes // 2, reserve), size=json_size)
        self._left = header_length  # JSON bytes still to come (None: the whole body)
        self._reserve = reserve
        binary_size = body_size - header_length if header_length is not None and body_size is not None else None
        self._binary = bytearray(binary_size or 0)
        self._filled = 0
        self._reserved_binary = 0
        if binary_size and reserve is not None:
            self._reserved_binary = reserve(binary_size) or binary_size

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            if self._left is None:
                self._json.feed(view)
                return
            head, view = view[:self._left], view[self._left:]
            if head:
                self._json.feed(head)
                self._left -= len(head)
        except ValueError as exc:  # JsonStreamError
            raise bad(f"request body is not valid JSON: {exc}") from None
        if view:
            end = self._filled + len(view)
            if end > self._reserved_binary and self._reserve is not None:  # size not known up front: count as it grows
                self._reserved_binary += self._reserve(end - self._reserved_binary) or end - self._reserved_binary
            self._binary[self._filled:min(end, len(self._binary))] = view  # (grows the buffer when it must)
            self._filled = end

    def finish(self) -> tuple[Any, memoryview | None]:
        """(the JSON header, the binary section or None)."""
        if self._left not in (None, 0):
            raise bad(f"Inference-Header-Content-Length runs {self._left} bytes past the end of the body")
        try:
            document = self._json.close()
        except ValueError as exc:
            raise bad(f"request body is not valid JSON: {exc}") from None
        return document, (memoryview(self._binary)[:self._filled] if self._left is not None else None)


def decode_infer_body(body: bytes, header_length: int | None, max_body_bytes: int = 1 << 30) -> InferRequest:
    """A whole infer body at once (what the HTTP route does chunk by chunk)."""
    decoder = BodyDecoder(split_header(None if header_length is None else str(header_length), len(body)), max_body_bytes,
                          body_size=len(body))
    decoder.feed(body)
    return infer_request_from_json(*decoder.finish())


def _tensor_from_json(item: Any, index: int, binary: memoryview | None, offset: int) -> tuple[str, np.ndarray, int]:
    """One ``inputs[i]`` object → (name, array, bytes of the binary section consumed)."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise bad(f"{where}: expected an object with name, shape, datatype, data")
    unknown = set(item) - {"name", "shape", "datatype", "data", "parameters"}
    if unknown:
        raise bad(f"{where}: unknown keys {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}: 'name' must be a non-empty string")
    where = f"input {name!r}"
    shape = check_shape(item.get("shape"), where)
    datatype = check_datatype(item.get("datatype"), where)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad(f"{where}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if binary is None:
            raise bad(f"{where}: binary_data_size given but the request has no binary section "
                      "(send the Inference-Header-Content-Length header)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise bad(f"{where}: binary_data_size {size!r} runs past the {len(binary)}-byte binary section")
        return name, decode_tensor(where, shape, datatype, raw=binary[offset:offset + size]), size
    if "data" not in item:
        raise bad(f"{where}: 'data' is missing")
    data = item["data"]
    if not isinstance(data, (list, np.ndarray)):
        raise bad(f"{where}: 'data' must be a (flat or nested) list")
    if isinstance(data, list) and datatype != BYTES:
        data = _flatten(data, where)
    return name, decode_tensor(where, shape, datatype, values=data), 0


def _flatten(data: list, where: str) -> list:
    """Nested JSON lists (data that came before its datatype) in row-major order."""
    while any(isinstance(x, list) for x in data):
        if not all(isinstance(x, list) for x in data):
            raise bad(f"{where}: 'data' is not a regular list (numbers and lists mixed)")
        data = [y for x in data for y in x]
    return data


def split_header(header_length: str | None, total: int | None) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked."""
    if header_length is None:
        return None
    try:
        n = int(header_length)
    except ValueError:
        raise bad(f"bad Inference-Header-Content-Length {header_length!r}") from None
    if n < 0 or (total is not None and n > total):
        raise bad(f"Inference-Header-Content-Length {n} is outside the {total}-byte body")
    return n


def infer_request_from_json(request: Any, binary: memoryview | None) -> InferRequest:
    """The decoded JSON header (+ binary section) of an HTTP infer call → :class:`InferRequest`."""
    if not isinstance(request, dict):
        raise bad("request body must be a JSON object with an 'inputs' list")
    unknown = set(request) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise bad(f"unknown request keys {sorted(unknown)}")
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        name, array, used = _tensor_from_json(item, i, binary, offset)
        if name in inputs:
            raise bad(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if binary is not None and offset != len(binary):
        raise bad(f"binary section has {len(binary)} bytes but the inputs use {offset}")
    outputs = request.get("outputs")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise bad("'outputs' must be a list of objects with a 'name'")
        wanted = [requested_output(o.get("name"), o.get("parameters"), f"outputs[{i}]") for i, o in enumerate(outputs)]
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("'id' must be a string")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("'parameters' must be an object")
    return InferRequest(inputs, wanted, request_id, _flag(params, "binary_data_output", "request"))


MAX_PUSH_SAMPLES = 100_000


def stream_push_from_json(request: Any, binary: memoryview | None) -> tuple[np.ndarray, np.ndarray]:
    """``{"ts": [...], "shape": [N, ...], "datatype", "data"|parameters.binary_data_size}`` → (ts, samples)."""
    if not isinstance(request, dict):
        raise bad("request body must be a JSON object with ts, shape, datatype and data")
    ts = request.pop("ts", None)
    if not isinstance(ts, (list, np.ndarray)) or not len(ts) or len(ts) > MAX_PUSH_SAMPLES:
        raise bad(f"'ts' must be a non-empty list of at most {MAX_PUSH_SAMPLES} timestamps (seconds)")
    try:
        stamps = np.asarray(ts, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise bad(f"'ts' must be numbers: {exc}") from None
    if stamps.ndim != 1 or not np.isfinite(stamps).all():
        raise bad("'ts' must be a flat list of finite numbers")
    request.setdefault("name", "samples")
    _, samples, used = _tensor_from_json(request, 0, binary, 0)
    if binary is not None and used != len(binary):
        raise bad(f"binary section has {len(binary)} bytes but the samples use {used}")
    if samples.ndim < 1 or samples.shape[0] != stamps.size:
        raise bad(f"'shape' must start with the number of samples ({stamps.size}), got {list(samples.shape)}")
    return stamps, samples


# ---- checking a request against a model ----------------------------------------------------------

def bind(request: InferRequest, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """The arrays to run: checked against the signature (names, dtypes, shapes, BYTES↔strings)."""
    from ..runtime.backends.base import check_inputs

    feed = {}
    for spec in inputs:
        array = request.inputs.get(spec.name)
        if array is not None:
            takes_strings = np.dtype(spec.dtype).kind in "OSU"
            if (array.dtype == object) != takes_strings:
                got = BYTES if array.dtype == object else v2_datatype(array.dtype)
                raise bad(f"input {spec.name!r}: datatype {got} but the model takes {v2_datatype(spec.dtype)}")
            if takes_strings:
                array = np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array)
                array = array.astype(spec.dtype) if np.dtype(spec.dtype).kind == "U" else array
            feed[spec.name] = array
    feed.update({k: v for k, v in request.inputs.items() if k not in feed})
    try:
        check_inputs(inputs, feed)
    except InputError as exc:
        raise bad(str(exc)) from None
    if request.outputs is not None:
        known = {s.name: s for s in outputs}
        unknown = [o.name for o in request.outputs if o.name not in known]
        if unknown:
            raise bad(f"unknown outputs {unknown}; the model has {list(known)}")
        for o in request.outputs:
            if o.class_count and np.dtype(known[o.name].dtype).kind not in "iuf":
                raise bad(f"output {o.name!r}: classification needs a numeric output, it is {known[o.name].dtype}")
    return feed


# ---- results -------------------------------------------------------------------------------------

@dataclass
class InferResult:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[str, np.ndarray]]
    binary: set[str] = field(default_factory=set)


def classify(array: np.ndarray, count: int, labels: list[str] | None) -> np.ndarray:
    """Top-``count`` classes along the last axis as BYTES ``"score:index[:label]"`` (Triton's format)."""
    scores = np.asarray(array)
    scores = scores.reshape(1, -1) if scores.ndim <= 1 else scores
    count = min(count, scores.shape[-1])
    flat = scores.reshape(-1, scores.shape[-1])
    order = np.argsort(-flat.astype(np.float64), axis=-1, kind="stable")[:, :count]
    out = np.empty(order.shape, dtype=object)
    for row, indices in enumerate(order):
        for k, index in enumerate(indices):
            text = f"{str(flat[row, index])}:{index}"  # str(): the shortest repr of the value in its own dtype
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            out[row, k] = text.encode()
    return out.reshape((*scores.shape[:-1], count) if np.asarray(array).ndim > 1 else (count,))


def make_result(model_name: str, version: int, request: InferRequest, outputs: dict[str, np.ndarray],
                labels: dict[str, list[str]]) -> InferResult:
    chosen = request.outputs if request.outputs is not None else [RequestedOutput(n) for n in outputs]
    result = InferResult(model_name, str(version), request.id, [])
    for out in chosen:
        array = np.asarray(outputs[out.name])
        if out.class_count:
            array = classify(array, out.class_count, labels.get(out.name))
        result.outputs.append((out.name, array))
        if out.binary or request.binary_output:
            result.binary.add(out.name)
    return result


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_values(array: np.ndarray) -> list:
    """A tensor's elements for JSON. Non-finite floats become the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``: strict JSON, and ``numpy.asarray(data, float32)`` (what tritonclient does)
    reads them back as the same values."""
    if array.dtype == object:
        return [x.decode("utf-8", "backslashreplace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    values = array.ravel().tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = [x if math.isfinite(x) else _NON_FINITE.get(x, "NaN") for x in values]
    return values


def raw_bytes(array: np.ndarray) -> bytes:
    return serialize_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()


def result_to_http(result: InferResult) -> tuple[bytes, dict[str, str]]:
    """(body, headers): JSON, followed by the binary section when an output was asked binary."""
    head: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version, "outputs": []}
    if result.id is not None:
        head["id"] = result.id
    blobs = []
    for name, array in result.outputs:
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array.dtype), "shape": list(array.shape)}
        if name in result.binary:
            raw = raw_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = json_values(array)
        head["outputs"].append(entry)
    text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(text))}


def check_repository_parameters(params: dict[str, Any]) -> None:
    """Load/unload parameters: ``unload_dependents`` is accepted (there are no ensembles); a model
    config or files to load from are not: models come from their releases."""
    unknown = sorted(set(params) - {"unload_dependents"})
    if unknown:
        raise bad(f"repository parameters {unknown} are not supported: models come from their signed releases")


# ---- metadata and config -------------------------------------------------------------------------

def _dims(shape: list[int | str | None]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def tensor_metadata(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": _dims(s.shape)} for s in specs]


def platform_of(backend: str, target: str) -> str:
    """Triton's platform naming: ``onnxruntime_onnx``; a backend named after its format stays as is."""
    return backend if backend == target else f"{backend}_{target}"


def model_config(name: str, manifest: Manifest, variant_id: str | None, backend: str, precision: str,
                 versions: list[int]) -> dict[str, Any]:
    """A Triton-style model configuration (the JSON form of Triton's ``ModelConfig`` message, so
    ``tritonclient`` reads it over HTTP and gRPC). What Triton has no field for — the variants and
    the precision served — is in ``parameters`` (string values, as in Triton)."""
    variant = next((v for v in manifest.variants if v.id == variant_id), None) or \
        next((v for v in manifest.variants if v.ok), manifest.variants[0])
    variants = [{"id": v.id, "target": v.target.value, "precision": v.precision.value, "backend": v.backend,
                 "status": v.status, "profiles": v.profiles} for v in manifest.variants]

    def io(spec: TensorSpec, output: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": spec.name, "data_type": "TYPE_" + ("STRING" if v2_datatype(spec.dtype) == BYTES
                                                                               else v2_datatype(spec.dtype)),
                                 "dims": _dims(spec.shape)}
        if not output and spec.constant is not None:
            entry["optional"] = True  # fixed at conversion (--constant-input): may be left out
        if output and spec.name in manifest.labels:
            entry["label_filename"] = f"labels/{spec.name}.txt"
        return entry

    return {
        "name": name,
        "platform": platform_of(backend, variant.target.value),
        "backend": backend,
        "version_policy": {"specific": {"versions": [str(v) for v in versions]}},
        "max_batch_size": 0,  # shapes are served as the model declares them, batch axis included
        "input": [io(s, False) for s in variant.inputs],
        "output": [io(s, True) for s in variant.outputs],
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": 1}],
        "parameters": {
            "release_version": {"string_value": str(manifest.version)},
            "variant": {"string_value": variant.id},
            "precision": {"string_value": precision},
            "variants": {"string_value": json.dumps(variants, separators=(",", ":"))},
        },
    }
