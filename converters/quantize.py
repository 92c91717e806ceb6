"""ONNX precision conversion: FP16, INT8 dynamic, INT8 static QDQ (per-channel, calibrated).

FP16 uses ``onnxruntime.transformers.float16`` with FP32 I/O kept: ``onnxconverter_common``'s
converter writes Cast nodes some models cannot load (EVAL_CASES). Static INT8 runs
``quant_pre_process`` first (``skip_symbolic_shape`` avoids a sympy dependency) and falls back to
the plain model when pre-processing fails. Quantizers silently skip subgraphs (If/Loop bodies),
so every result counts what was really quantized and says so when nothing was.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import ConversionError
from .targets.base import CalibrationMethod, Feeds
from .toollog import quiet

_SUBGRAPH_OPS = ("If", "Loop", "Scan")


@dataclass
class QuantizeReport:
    nodes_quantized: int
    nodes_kept_fp32: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def to_fp16(src: Path, dst: Path) -> QuantizeReport:
    """FP16 weights and compute, FP32 inputs/outputs (so callers feed the same arrays)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ConversionError(f"fp16 conversion failed: {_first_line(exc)}") from None
    onnx.save(converted, str(dst))
    floats = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    report = QuantizeReport(nodes_quantized=floats)
    if floats == 0:
        report.notes.append("nothing was converted to fp16 (no float initializers in the main graph)")
    return report


def quantize_dynamic_int8(src: Path, dst: Path) -> QuantizeReport:
    """INT8 weights, activations quantized at run time (no calibration; often slow on conv nets)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet():
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    except Exception as exc:
        dst.unlink(missing_ok=True)
        raise ConversionError(f"dynamic int8 quantization failed: {_first_line(exc)}") from exc
    return _count(dst, "dynamic")


def quantize_static_int8(src: Path, dst: Path, calibration: Sequence[Feeds], *,
                         method: CalibrationMethod = CalibrationMethod.MINMAX, per_channel: bool = True,
                         nodes_to_exclude: Sequence[str] = ()) -> QuantizeReport:
    """Static QDQ INT8 (S8 weights per channel, U8 activations) calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
    with tempfile.TemporaryDirectory(prefix="edge-sdk-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with quiet():
                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the plain model instead
            notes.append(f"quant_pre_process failed ({_first_line(exc)}); quantized the model as is")
            prepared = src
        excluded = _existing_nodes(prepared, nodes_to_exclude)
        try:
            with quiet():
                quantize_static(
                    str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=ort_method,
                    nodes_to_exclude=excluded,
                    extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
                )
        except Exception as exc:
            dst.unlink(missing_ok=True)  # e.g. a full disk mid-write: no half-written model stays behind
            raise ConversionError(f"static int8 quantization ({method.value}) failed: {_first_line(exc)}") from exc
    report = _count(dst, "static")
    report.notes[:0] = notes
    report.notes.append(f"static QDQ, {'per-channel' if per_channel else 'per-tensor'} weights, "
                        f"{method.value} calibration on {len(calibration)} samples")
    report.nodes_kept_fp32 = list(excluded)
    return report


def _existing_nodes(path: Path, names: Sequence[str]) -> list[str]:
    if not names:
        return []
    present = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    return [n for n in names if n in present]


def _count(path: Path, kind: str) -> QuantizeReport:
    """How many main-graph nodes run on quantized inputs; notice subgraphs the quantizer skipped."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer_ops = {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul"}
    quantized = [n.name for n in graph.node if n.op_type in integer_ops
                 or (n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in n.input))]
    report = QuantizeReport(nodes_quantized=len(quantized))
    subgraphs = [n.name or n.op_type for n in graph.node if n.op_type in _SUBGRAPH_OPS]
    if subgraphs:
        report.notes.append(f"{kind} int8: subgraphs of {subgraphs[:5]} are not quantized (quantizers skip If/Loop/Scan bodies)")
    if not quantized:
        report.notes.append(f"{kind} int8: nothing was quantized (no quantizable ops in the main graph)")
    return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
