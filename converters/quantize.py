"""ONNX precision conversion: FP16, INT8 dynamic, INT8 static QDQ (per-channel or per-tensor, calibrated).

FP16 uses ``onnxruntime.transformers.float16`` with FP32 I/O kept: ``onnxconverter_common``'s
converter writes Cast nodes some models cannot load (EVAL_CASES); nodes named in ``keep_fp32``
stay FP32 (the sensitivity search keeps overflowing ops there). Both INT8 modes run
``quant_pre_process`` first (``skip_symbolic_shape`` avoids a sympy dependency) and falls back to
the plain model when pre-processing fails. Quantizers skip subgraphs (If/Loop bodies) unless
told otherwise (dynamic mode can quantize them), so every result counts what was really
quantized and says so when nothing was. A quantizer that fails raises :class:`ConversionError`
chained to the tool's own exception, which the pipeline reports by where it happened (the full
text goes to the variant's tool log).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import ConversionError
from .targets.base import CalibrationMethod, Feeds
from .toollog import quiet

SUBGRAPH_OPS = ("If", "Loop", "Scan")
_INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul",
                          "DynamicQuantizeLSTM", "QAttention"})


@dataclass
class QuantizeReport:
    nodes_quantized: int
    nodes_kept_fp32: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def to_fp16(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> QuantizeReport:
    """FP16 weights and compute, FP32 inputs/outputs (so callers feed the same arrays); ``keep_fp32`` nodes stay FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    kept = _existing_nodes(model, keep_fp32)
    try:
        with quiet():
            converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept or None)
    except Exception as exc:
        raise ConversionError("onnxruntime's fp16 converter failed") from exc
    _drop_round_trip_casts(converted)
    onnx.save(converted, str(dst))
    floats = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    report = QuantizeReport(nodes_quantized=floats, nodes_kept_fp32=kept)
    if floats == 0:
        report.notes.append("nothing was converted to fp16 (no float initializers in the main graph)")
    return report


def _drop_round_trip_casts(model: onnx.ModelProto) -> None:
    """Remove FP32 -> FP16 -> FP32 cast pairs the converter puts between two FP32-kept nodes.

    ``convert_float_to_float16`` casts every kept node's output to FP16, also when the next node is
    kept too: a value beyond 65504 passed between them would still overflow there.
    """
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    removed: list[onnx.NodeProto] = []
    for down in list(graph.node):
        half = down.output[0] if cast_to(down) == onnx.TensorProto.FLOAT16 else None
        users = consumers.get(half, []) if half else []
        if (not users or half in outputs or any(cast_to(u) != onnx.TensorProto.FLOAT or u.output[0] in outputs
                                                for u in users)):
            continue
        for up in users:  # readers of the FP32 copy read the original FP32 tensor instead
            for reader in consumers.get(up.output[0], []):
                reader.input[:] = [down.input[0] if i == up.output[0] else i for i in reader.input]
            removed.append(up)
        removed.append(down)
    kept = [n for n in graph.node if not any(n is r for r in removed)]
    del graph.node[:]
    graph.node.extend(kept)


def quantize_dynamic_int8(src: Path, dst: Path, *, op_types: Sequence[str] | None = None, per_channel: bool = False,
                          nodes_to_exclude: Sequence[str] = (), subgraphs: bool = False,
                          final: bool = True) -> QuantizeReport:
    """INT8 weights, activations quantized at run time (no calibration; fast on MatMul, often slow on conv nets).

    ``per_channel`` weights keep transformers accurate (per-tensor S8 weights lose several points of
    cosine on all-MiniLM-L6); ``subgraphs`` also quantizes If/Loop/Scan bodies (``EnableSubgraph``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: list[str] = []
    with _prepared(src, notes) as prepared:
        excluded = _existing_nodes(onnx.load(str(prepared), load_external_data=False), nodes_to_exclude)
        try:
            with quiet():
                quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=list(op_types or []), per_channel=per_channel,
                                 nodes_to_exclude=excluded, extra_options={"EnableSubgraph": subgraphs})
        except Exception as exc:
            dst.unlink(missing_ok=True)
            raise ConversionError("dynamic int8 quantization failed inside onnxruntime's quantizer") from exc
        if final:  # a model another pass quantizes next keeps its value_info: types past com.microsoft ops
            _shorten_added_names(dst, prepared)
    report = _count(dst, "dynamic")
    report.notes[:0] = notes
    report.nodes_kept_fp32 = excluded
    report.notes.append(f"dynamic INT8 ({'per-channel' if per_channel else 'per-tensor'} INT8 weights, activations "
                        "quantized at run time)" + (f", op types {list(op_types)}" if op_types else ""))
    return report


@contextlib.contextmanager
def _prepared(src: Path, notes: list[str]) -> Iterator[Path]:
    """``src`` after onnxruntime's ``quant_pre_process`` (BatchNorm folded, Constant nodes made
    initializers: the quantizer finds weights only there), for the duration of the block; the
    model as is, with a note, when pre-processing fails (it is an optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edge-sdk-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with quiet():
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"quant_pre_process failed ({type(exc).__name__}); quantized the model as is")
            prepared = src
        yield prepared


def quantize_static_int8(src: Path, dst: Path, calibration: Sequence[Feeds], *,
                         method: CalibrationMethod = CalibrationMethod.MINMAX, per_channel: bool = True,
                         nodes_to_exclude: Sequence[str] = (), op_types: Sequence[str] | None = None,
                         extra_options: Mapping[str, Any] | None = None) -> QuantizeReport:
    """Static QDQ INT8 (S8 weights, U8 activations) calibrated on ``calibration``.

    ``op_types``: quantize only these op types (None: every type onnxruntime can); ``extra_options``
    are onnxruntime's (e.g. ``QDQDisableWeightAdjustForInt32Bias``). Integer and bool inputs are fed
    to calibration as they are; only float tensors are ever quantized.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationMethod as OrtMethod

    if not calibration:
        raise ConversionError("static int8 quantization needs calibration samples")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[Feeds] = iter(calibration)

        def get_next(self) -> Feeds | None:
            return next(self._items, None)

        def rewind(self) -> None:
            self._items = iter(calibration)

    notes = []
    ort_method = {CalibrationMethod.MINMAX: OrtMethod.MinMax, CalibrationMethod.ENTROPY: OrtMethod.Entropy,
                  CalibrationMethod.PERCENTILE: OrtMethod.Percentile}[method]
    options = {"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False, **(extra_options or {})}
    with _prepared(src, notes) as prepared:
        excluded = _existing_nodes(onnx.load(str(prepared), load_external_data=False), nodes_to_exclude)
        try:
            with quiet():
                quantize_static(
                    str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=ort_method,
                    nodes_to_exclude=excluded, op_types_to_quantize=list(op_types or []), extra_options=options,
                )
        except Exception as exc:
            dst.unlink(missing_ok=True)  # e.g. a full disk mid-write: no half-written model stays behind
            raise ConversionError(f"static int8 quantization ({method.value}) failed inside onnxruntime's quantizer") from exc
        _shorten_added_names(dst, prepared)
    report = _count(dst, "static")
    report.notes[:0] = notes
    report.notes.append(f"static QDQ, {'per-channel' if per_channel else 'per-tensor'} weights, "
                        f"{method.value} calibration on {len(calibration)} samples"
                        + (f", op types {list(op_types)}" if op_types else ""))
    report.nodes_kept_fp32 = excluded
    return report


def subgraph_nodes(graph: onnx.GraphProto) -> int:
    """How many nodes sit inside the If/Loop/Scan bodies of ``graph`` (at any depth)."""
    return len(all_nodes(graph)) - len(graph.node)


def _existing_nodes(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    if not names:
        return []
    present = {node.name for node in all_nodes(model.graph)}
    return [n for n in names if n in present]


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``graph``'s nodes, If/Loop/Scan bodies included, in order."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                nodes += all_nodes(body)
    return nodes


def _shorten_added_names(dst: Path, source: Path) -> None:
    """Give what the quantizer added short names (``conv.w_0_quantized``, ``x_DequantizeLinear_Output``,
    its Q/DQ nodes) and drop ``value_info``, which nothing reads from an INT8 model: in a small model
    those names are a third of the file (PP-OCR's 0.6 MB classifier: 316 KB -> 221 KB). The names
    the model had are kept, so the sensitivity search still maps INT8 nodes to FP32 ones. Models
    with subgraphs (outer-scope names) or external data are left as written."""
    model = onnx.load(str(dst), load_external_data=False)
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer) or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    original = onnx.load(str(source), load_external_data=False).graph
    kept = ({n.name for n in original.node} | {t for n in original.node for t in (*n.input, *n.output)}
            | {t.name for t in original.initializer} | {v.name for v in (*original.input, *original.output)}
            | {v.name for v in (*graph.input, *graph.output)})
    short: dict[str, str] = {}

    def name(old: str) -> str:
        if not old or old in kept:
            return old
        if old not in short:
            short[old] = f"_{len(short)}"
            while short[old] in kept:
                short[old] += "_"
        return short[old]

    for node in graph.node:
        node.input[:] = [name(t) for t in node.input]
        node.output[:] = [name(t) for t in node.output]
        node.name = name(node.name)
    for tensor in graph.initializer:
        tensor.name = name(tensor.name)
    del graph.value_info[:]
    onnx.save(model, str(dst))


def _count(path: Path, kind: str) -> QuantizeReport:
    """How many nodes run on quantized inputs; say how many inside subgraphs were left FP32."""
    model = onnx.load(str(path), load_external_data=False)
    quantized, inside, left = _quantized_nodes(model.graph)
    report = QuantizeReport(nodes_quantized=quantized)
    if left:
        report.notes.append(f"{kind} int8: {left} nodes inside subgraphs (If/Loop/Scan bodies) left FP32")
    elif inside:
        report.notes.append(f"{kind} int8: {inside} of the quantized nodes are inside subgraphs (If/Loop/Scan bodies)")
    if not quantized:
        report.notes.append(f"{kind} int8: nothing was quantized (no quantizable ops in the main graph)")
    return report


def _quantized_nodes(graph: onnx.GraphProto, depth: int = 0) -> tuple[int, int, int]:
    """(quantized nodes, of which inside subgraphs, subgraph nodes left float) below ``graph``."""
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = sum(1 for n in graph.node if n.op_type in _INTEGER_OPS
                    or (n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in n.input)))
    inside = quantized if depth else 0
    left = 0
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                sub_quantized, sub_inside, sub_left = _quantized_nodes(body, depth + 1)
                quantized += sub_quantized
                inside += sub_inside
                left += sub_left + (len(body.node) if sub_quantized == 0 else 0)
    return quantized, inside, left
