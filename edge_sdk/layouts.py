"""Where the tensors are inside model files: byte spans that chunking cuts at.

Each reader finds the tensor data of one file format without loading the model: ONNX (a
protobuf walk that skips tensor bytes; tensors held in external data files are found through
the ``.onnx`` beside them), TFLite (the flatbuffer's buffer table), OpenVINO IR (the ``Const``
offsets in the ``.xml`` beside the ``.bin``) and ncnn (the ``.param`` beside the ``.bin``,
walked layer by layer as ncnn's ``ModelBin`` reads it).

Spans are hints for where to cut, never a source of truth: a chunk boundary anywhere is
correct, because the manifest pins every chunk's hash. So a reader that meets something it
does not know stops and returns what it found so far (or nothing), and never raises.
"""

from __future__ import annotations

import logging
import mmap
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .registry import Registry

log = logging.getLogger(__name__)

Span = tuple[int, int]  # (offset, length) of one tensor's bytes


@dataclass(frozen=True)
class LayoutReader:
    """Finds the tensor spans of the files it ``claims`` (by name and the files beside them)."""

    claims: Callable[[Path], bool]
    spans: Callable[[Path], list[Span]]


LAYOUTS: Registry[LayoutReader] = Registry("file layout")


def tensor_spans(path: Path | str) -> list[Span]:
    """Sorted, non-overlapping spans of tensor data in ``path`` (empty when no reader knows it)."""
    path = Path(path)
    for name in LAYOUTS.names():
        reader = LAYOUTS.get(name)
        try:
            if not reader.claims(path):
                continue
            found = reader.spans(path)
        except (OSError, ValueError, IndexError, struct.error, ET.ParseError) as exc:
            log.debug("%s layout of %s not read: %s", name, path, exc)
            return []
        return _clean(found, path.stat().st_size)
    return []


def _clean(spans: list[Span], size: int) -> list[Span]:
    """Drop empty, out-of-file and overlapping spans; sort."""
    out: list[Span] = []
    end = 0
    for offset, length in sorted(s for s in spans if s[1] > 0 and s[0] >= 0 and s[0] + s[1] <= size):
        if offset >= end:
            out.append((offset, length))
            end = offset + length
    return out


def _mapped(path: Path) -> mmap.mmap | None:
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            return None
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


# --- ONNX: a protobuf wire-format walk -----------------------------------------------------------
# Field numbers from onnx.proto. Only messages that can hold tensors are entered.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _TRAINING, _ENTRY = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
}
_TENSOR_DATA_FIELDS = {4, 5, 7, 9, 10, 11}  # float/int32/int64/raw/double/uint64 data (packed)


@dataclass(frozen=True)
class ExternalTensor:
    location: str
    offset: int
    length: int


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end or varint value) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield field, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield field, wire, pos, pos
        else:
            raise ValueError(f"wire type {wire} is not proto3")


def onnx_tensors(path: Path) -> tuple[list[Span], list[ExternalTensor]]:
    """(spans of tensor data inside ``path``, tensors stored in external data files)."""
    buf = _mapped(path)
    if buf is None:
        return [], []
    spans: list[Span] = []
    external: list[ExternalTensor] = []
    try:
        stack = [(_MODEL, 0, len(buf))]
        while stack:
            kind, start, end = stack.pop()
            entries: dict[str, str] = {}
            location_external = False
            for field, wire, a, b in _fields(buf, start, end):
                if kind == _TENSOR and wire == 2 and field in _TENSOR_DATA_FIELDS:
                    spans.append((a, b - a))
                elif kind == _TENSOR and field == 14 and wire == 0:
                    location_external = a == 1
                elif kind == _TENSOR and field == 13 and wire == 2:
                    key = value = ""
                    for f, w, x, y in _fields(buf, a, b):
                        if w == 2 and f in (1, 2):
                            text = bytes(buf[x:y]).decode("utf-8", "replace")
                            key, value = (text, value) if f == 1 else (key, text)
                    entries[key] = value
                elif wire == 2 and field in _CHILDREN.get(kind, {}):
                    child = _CHILDREN[kind][field]
                    if child != _ENTRY:
                        stack.append((child, a, b))
            if kind == _TENSOR and location_external and "location" in entries:
                try:
                    external.append(ExternalTensor(entries["location"], int(entries.get("offset", 0)),
                                                   int(entries.get("length", -1))))
                except ValueError:
                    pass
    finally:
        buf.close()
    return spans, external


def _external_spans(path: Path) -> list[Span]:
    """Spans of an external data file, from the ``.onnx`` files beside it that point into it."""
    spans: list[Span] = []
    for model in sorted(path.parent.glob("*.onnx")):
        _, external = onnx_tensors(model)
        for tensor in external:
            if (model.parent / tensor.location).resolve() == path.resolve():
                length = tensor.length if tensor.length >= 0 else path.stat().st_size - tensor.offset
                spans.append((tensor.offset, length))
    return spans


def _may_be_onnx_data(path: Path) -> bool:
    """External data files may have any name: anything the other readers do not claim."""
    others = ("onnx", "tflite", "openvino", "ncnn")
    return not any(LAYOUTS.get(name).claims(path) for name in others) and any(path.parent.glob("*.onnx"))


LAYOUTS.register("onnx")(LayoutReader(lambda p: p.suffix == ".onnx", lambda p: onnx_tensors(p)[0]))
LAYOUTS.register("onnx-external-data")(LayoutReader(_may_be_onnx_data, _external_spans))


# --- TFLite: the flatbuffer's buffers -----------------------------------------------------------
def _table_field(buf, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the flatbuffer table at ``table`` (None if absent)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vtable_size = struct.unpack_from("<H", buf, vtable)[0]
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return None
    offset = struct.unpack_from("<H", buf, vtable + slot)[0]
    return table + offset if offset else None


def _deref(buf, pos: int) -> int:
    return pos + struct.unpack_from("<I", buf, pos)[0]


def tflite_spans(path: Path) -> list[Span]:
    """``Model.buffers[i].data`` (schema field 4, Buffer field 0), or ``offset``/``size`` for data
    stored after the flatbuffer (models over 2 GB)."""
    buf = _mapped(path)
    if buf is None:
        return []
    spans: list[Span] = []
    try:
        root = _deref(buf, 0)
        field = _table_field(buf, root, 4)
        if field is None:
            return []
        vector = _deref(buf, field)
        (count,) = struct.unpack_from("<I", buf, vector)
        for i in range(count):
            table = _deref(buf, vector + 4 + 4 * i)
            data = _table_field(buf, table, 0)
            if data is not None:
                start = _deref(buf, data)
                spans.append((start + 4, struct.unpack_from("<I", buf, start)[0]))
                continue
            offset, size = _table_field(buf, table, 1), _table_field(buf, table, 2)
            if offset is not None and size is not None:
                spans.append((struct.unpack_from("<Q", buf, offset)[0], struct.unpack_from("<Q", buf, size)[0]))
    finally:
        buf.close()
    return spans


LAYOUTS.register("tflite")(LayoutReader(lambda p: p.suffix == ".tflite", tflite_spans))


# --- OpenVINO IR: Const layers in the .xml ------------------------------------------------------
def _openvino_xml(path: Path) -> Path:
    return path.with_suffix(".xml")


def openvino_spans(path: Path) -> list[Span]:
    spans = []
    for _, element in ET.iterparse(_openvino_xml(path)):
        if element.tag == "data" and "offset" in element.attrib and "size" in element.attrib:
            spans.append((int(element.attrib["offset"]), int(element.attrib["size"])))
        element.clear()
    return spans


LAYOUTS.register("openvino")(LayoutReader(
    lambda p: p.suffix == ".bin" and _openvino_xml(p).is_file(), openvino_spans))


# --- ncnn: the .param walked as ModelBin reads the .bin -------------------------------------------
_NCNN_FP16, _NCNN_INT8, _NCNN_FP32_SCALED = 0x01306B47, 0x000D4B38, 0x0002C056


def _ncnn_param(path: Path) -> Path:
    return path.with_suffix(".param")


def _ncnn_layers(param: Path):
    """(layer type, {param id: value}) per layer line; array params are skipped."""
    lines = param.read_text().split("\n")
    if lines[0].strip() != "7767517":
        raise ValueError("not a text ncnn .param (magic 7767517)")
    for line in lines[2:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        layer_type, bottoms, tops = parts[0], int(parts[2]), int(parts[3])
        params: dict[int, float] = {}
        for item in parts[4 + bottoms + tops:]:
            key, _, value = item.partition("=")
            if int(key) > -23300 and "," not in value:
                params[int(key)] = float(value)
        yield layer_type, params


def _ncnn_blobs(layer_type: str, p: dict[int, float]) -> list[tuple[int, int]] | None:
    """(element count, ModelBin load type) of each blob ``layer_type`` loads, in order; None if
    the layer's weights are not known here (the walk stops there)."""
    g = lambda key, default=0: int(p.get(key, default))  # noqa: E731
    if layer_type.startswith(("Convolution", "Deconvolution")) or layer_type == "InnerProduct":
        if layer_type == "InnerProduct":
            out, bias, size, int8 = g(0), g(1), g(2), g(8)
        else:
            out, bias, size, int8 = g(0), g(5), g(6), g(8)
            if g(28 if layer_type.startswith("Deconvolution") else 19):  # dynamic weight: none in the .bin
                return []
        if int8:
            return None
        return [(size, 0)] + ([(out, 1)] if bias else [])
    if layer_type == "BatchNorm":
        return [(g(0), 1)] * 4
    if layer_type == "Scale":
        if g(0) == -233:  # scale from a second input blob
            return []
        return [(g(0), 1)] + ([(g(0), 1)] if g(1) else [])
    if layer_type == "Bias":
        return [(g(0), 1)]
    if layer_type == "PReLU":
        return [(g(0), 1)]
    if layer_type == "MemoryData":
        count = 1
        for key in (0, 1, 11, 2):
            count *= max(g(key), 1)
        return [(count, 1)]
    if layer_type in ("LayerNorm", "InstanceNorm"):
        channels, affine = g(0), g(2, 1 if layer_type == "LayerNorm" else 1)
        return [(channels, 1), (channels, 1)] if affine else []
    if layer_type == "GroupNorm":
        return [(g(1), 1), (g(1), 1)] if g(3, 1) else []
    if layer_type == "Embed":
        return [(g(3), 0)] + ([(g(0), 1)] if g(2) else [])
    if layer_type in {"Gemm", "MultiHeadAttention", "LSTM", "GRU", "RNN", "DeformableConv2D", "Dequantize",
                      "Quantize", "Requantize", "Normalize", "Padding", "RMSNorm"}:
        return None
    return []


def ncnn_spans(path: Path) -> list[Span]:
    size = path.stat().st_size
    spans: list[Span] = []
    with open(path, "rb") as handle:
        pos = 0
        for layer_type, params in _ncnn_layers(_ncnn_param(path)):
            blobs = _ncnn_blobs(layer_type, params)
            if blobs is None:
                break
            for count, load_type in blobs:
                if load_type == 1:
                    length = 4 * count
                else:
                    handle.seek(pos)
                    tag_bytes = handle.read(4)
                    if len(tag_bytes) < 4:
                        return spans
                    (tag,) = struct.unpack("<I", tag_bytes)
                    pos += 4
                    if tag == _NCNN_FP16:
                        length = (2 * count + 3) // 4 * 4
                    elif tag == _NCNN_INT8:
                        length = (count + 3) // 4 * 4
                    elif tag in (0, _NCNN_FP32_SCALED):
                        length = 4 * count
                    else:  # a quantization table (256 floats) and uint8 indices
                        pos += 1024
                        length = (count + 3) // 4 * 4
                if pos + length > size:
                    return spans
                spans.append((pos, length))
                pos += length
    return spans


LAYOUTS.register("ncnn")(LayoutReader(lambda p: p.suffix == ".bin" and _ncnn_param(p).is_file(), ncnn_spans))
