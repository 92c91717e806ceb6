"""The ONNX export target: FP32 (as checked), FP16, INT8 (a list of onnxruntime recipes), mixed INT8/FP32.

INT8 recipes, in the order they are tried (``converters/search.py`` runs them and keeps the best
accepted candidate):

1. ``qdq-per-channel``: static QDQ, per-channel S8 weights, U8 activations, every op type;
2. ``qdq-per-channel-no-bias-adjust``: the same with onnxruntime's
   ``QDQDisableWeightAdjustForInt32Bias``, only when 1 crashed (its int32-bias weight-scale
   adjustment fails on some per-channel weights);
3. ``qdq-conv-matmul-dynamic-lstm``: for graphs with LSTM weights, dynamic INT8 of the LSTMs
   (onnxruntime's QDQ quantizer leaves them FP32) and then static QDQ of Conv/MatMul/Gemm
   (silero-vad: 0.28x the size, 0.65x the latency, where 5 leaves its LSTM at 0.59x the size);
4. ``dynamic-matmul``: dynamic INT8 of MatMul/Gemm with per-channel weights, and of the embedding
   tables (Gather), for MatMul-heavy graphs (transformer encoders, where static QDQ of every op
   collapses: measured on all-MiniLM-L6, cosine to FP32 0.993 at 0.25x the size; per-tensor
   weights give 0.955);
5. ``qdq-conv-matmul``: per-channel, only Conv/MatMul/Gemm quantized and only MatMuls by weights
   (``MatMulConstBOnly``): the other ops keep FP32 activations, transformers lose far less;
6. ``qdq-conv-matmul-no-bias-adjust``: 5 with the workaround of 2, only when 5 crashed (magika:
   the same crash as 1, and this is the recipe that keeps its held-out top-1);
7. ``qdq-conv-matmul-percentile``: 5 with activation ranges at the 99.999th percentile instead of
   min/max, so a few outlying activations do not stretch a range that the rest then lose precision
   in (PP-OCRv4 det, a DBNet: 3.81 points F1 lost with min/max on validation, 1.24 with the
   percentile; 6.81 and 0.46 held out);
8. ``qdq-per-tensor``: per-tensor weights, every op type;
9. ``qdq-per-tensor-conv-matmul``: per-tensor, only Conv/MatMul/Gemm (MatMuls by weights);
10. ``dynamic``: dynamic INT8 of every op type, the only choice without calibration data.

5 to 10 are fallbacks (tried while nothing is accepted); ``--per-tensor`` keeps to the per-tensor
recipes. FP16 tries the whole graph, then keeps the nodes that overflow or lose most in FP32
(``fp16-keep-sensitive``); MIXED is the accuracy-aware search on the most accurate static recipe
(on the most accurate dynamic one when no static recipe quantized anything: weights inside an
``If``, which only dynamic INT8 reaches).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ...errors import ConversionError
from ...types import Precision, Target
from .. import quantize
from .base import CalibrationMethod, ExportRequest, ExportResult, ExportTarget, ModelFacts, Recipe, When

CONV_MATMUL = ("Conv", "MatMul", "Gemm")
# Only MatMuls by a constant (weights) are quantized, not activation x activation (attention scores).
WEIGHTS_ONLY_MATMUL = (("MatMulConstBOnly", True),)


class QuantMode(str, Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"


@dataclass(frozen=True)
class OnnxInt8:
    """How one INT8 recipe calls onnxruntime's quantizer."""

    mode: QuantMode
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None  # None: every op type onnxruntime quantizes
    extra_options: tuple[tuple[str, Any], ...] = ()
    # Op types given INT8 weights by dynamic quantization first, before a static pass on the rest:
    # onnxruntime's QDQ quantizer leaves an LSTM FP32, its dynamic one (DynamicQuantizeLSTM) does not.
    dynamic_op_types: tuple[str, ...] = ()
    calibration_method: CalibrationMethod | None = None  # None: the request's (--calibration-method)


def _per_channel(facts: ModelFacts) -> str | None:
    return None if facts.opset >= 13 else f"per-channel QDQ needs opset >= 13 (the model has {facts.opset})"


def _matmul_heavy(facts: ModelFacts) -> str | None:
    return None if facts.matmul_heavy else "most weights are in Conv layers (dynamic INT8 is slow there)"


def _lstm(facts: ModelFacts) -> str | None:
    return _per_channel(facts) or (None if facts.op_counts.get("LSTM") else "the graph has no LSTM")


def _no_matmul_recipe(facts: ModelFacts) -> str | None:
    return "dynamic-matmul covers this MatMul-heavy graph" if facts.matmul_heavy else None


INT8_RECIPES = (
    Recipe("qdq-per-channel", Precision.INT8, "static QDQ, per-channel weights, all op types",
           needs_calibration=True, applies=_per_channel, options=OnnxInt8(QuantMode.STATIC)),
    Recipe("qdq-per-channel-no-bias-adjust", Precision.INT8,
           "static QDQ per-channel without onnxruntime's int32-bias weight adjustment",
           needs_calibration=True, only_after_failure_of="qdq-per-channel", applies=_per_channel,
           options=OnnxInt8(QuantMode.STATIC, extra_options=(("QDQDisableWeightAdjustForInt32Bias", True),))),
    Recipe("qdq-conv-matmul-dynamic-lstm", Precision.INT8,
           "static QDQ per-channel of Conv/MatMul/Gemm, dynamic INT8 LSTM weights", needs_calibration=True,
           applies=_lstm, options=OnnxInt8(QuantMode.STATIC, op_types=CONV_MATMUL,
                                                   extra_options=WEIGHTS_ONLY_MATMUL, dynamic_op_types=("LSTM",))),
    Recipe("dynamic-matmul", Precision.INT8, "dynamic INT8 of MatMul/Gemm (per-channel) and embedding tables",
           applies=_matmul_heavy, options=OnnxInt8(QuantMode.DYNAMIC, op_types=("MatMul", "Gemm", "Gather"))),
    Recipe("qdq-conv-matmul", Precision.INT8, "static QDQ per-channel, only Conv/MatMul/Gemm quantized",
           when=When.FALLBACK, needs_calibration=True, applies=_per_channel,
           options=OnnxInt8(QuantMode.STATIC, op_types=CONV_MATMUL, extra_options=WEIGHTS_ONLY_MATMUL)),
    Recipe("qdq-conv-matmul-no-bias-adjust", Precision.INT8,
           "static QDQ per-channel, only Conv/MatMul/Gemm, without the int32-bias weight adjustment",
           when=When.FALLBACK, needs_calibration=True, only_after_failure_of="qdq-conv-matmul", applies=_per_channel,
           options=OnnxInt8(QuantMode.STATIC, op_types=CONV_MATMUL,
                            extra_options=WEIGHTS_ONLY_MATMUL + (("QDQDisableWeightAdjustForInt32Bias", True),))),
    Recipe("qdq-conv-matmul-percentile", Precision.INT8,
           "static QDQ per-channel, only Conv/MatMul/Gemm, activation ranges at the 99.999th percentile",
           when=When.FALLBACK, needs_calibration=True, applies=_per_channel,
           options=OnnxInt8(QuantMode.STATIC, op_types=CONV_MATMUL, extra_options=WEIGHTS_ONLY_MATMUL,
                            calibration_method=CalibrationMethod.PERCENTILE)),
    Recipe("qdq-per-tensor", Precision.INT8, "static QDQ, per-tensor weights, all op types",
           when=When.FALLBACK, needs_calibration=True, options=OnnxInt8(QuantMode.STATIC, per_channel=False)),
    Recipe("qdq-per-tensor-conv-matmul", Precision.INT8, "static QDQ per-tensor, only Conv/MatMul/Gemm quantized",
           when=When.FALLBACK, needs_calibration=True,
           options=OnnxInt8(QuantMode.STATIC, per_channel=False, op_types=CONV_MATMUL, extra_options=WEIGHTS_ONLY_MATMUL)),
    Recipe("dynamic", Precision.INT8, "dynamic INT8 of every op type", when=When.FALLBACK, applies=_no_matmul_recipe,
           options=OnnxInt8(QuantMode.DYNAMIC, per_channel=False)),
)
FP16_RECIPES = (
    Recipe("fp16", Precision.FP16, "FP16 weights and compute, FP32 inputs/outputs"),
    Recipe("fp16-keep-sensitive", Precision.FP16, "FP16 with the nodes that overflow or lose most kept FP32",
           when=When.FALLBACK, keeps_sensitive_nodes=True),
)
MIXED_RECIPES = (
    Recipe("int8-keep-sensitive", Precision.MIXED, "the most accurate INT8 recipe with its most "
           "sensitive nodes kept FP32", needs_calibration=True, keeps_sensitive_nodes=True),
)


class OnnxTarget(ExportTarget):
    target = Target.ONNX
    backend = "onnxruntime"

    def precisions(self) -> frozenset[Precision]:
        return frozenset(Precision)

    def recipes(self, precision: Precision) -> tuple[Recipe, ...]:
        if precision == Precision.INT8:
            return INT8_RECIPES
        if precision == Precision.FP16:
            return FP16_RECIPES
        if precision == Precision.MIXED:
            return MIXED_RECIPES
        return super().recipes(precision)

    def export(self, request: ExportRequest) -> ExportResult:
        request.out_dir.mkdir(parents=True, exist_ok=True)
        out = request.out_dir / f"{request.variant_id}.onnx"
        if request.precision == Precision.FP32:
            shutil.copyfile(request.model_path, out)
            report = quantize.QuantizeReport(nodes_quantized=0)
        elif request.precision == Precision.FP16:
            report = quantize.to_fp16(request.model_path, out, keep_fp32=request.nodes_to_exclude)
        elif request.precision in (Precision.INT8, Precision.MIXED):
            report = self._int8(request, out)
        else:  # pragma: no cover - Precision is a closed set
            raise ConversionError(f"onnx: unsupported precision {request.precision}")
        return ExportResult(files=[out], inputs=list(request.inputs), outputs=list(request.outputs),
                            notes=report.notes, nodes_quantized=report.nodes_quantized,
                            nodes_kept_fp32=report.nodes_kept_fp32)

    @staticmethod
    def _int8(request: ExportRequest, out) -> quantize.QuantizeReport:
        options = request.recipe.options if request.recipe is not None else None
        if not isinstance(options, OnnxInt8):  # no recipe: what the request alone asks for
            static = bool(request.calibration)
            options = OnnxInt8(QuantMode.STATIC if static else QuantMode.DYNAMIC, request.per_channel and static)
        subgraphs = quantize.subgraph_nodes(_graph(request)) > 0
        if options.mode == QuantMode.DYNAMIC:
            return quantize.quantize_dynamic_int8(request.model_path, out, op_types=options.op_types,
                                                  per_channel=options.per_channel,
                                                  nodes_to_exclude=request.nodes_to_exclude, subgraphs=subgraphs)
        source, first = request.model_path, None
        if options.dynamic_op_types:
            source = out.with_name(f"{out.stem}.dynamic-weights.onnx")
            first = quantize.quantize_dynamic_int8(request.model_path, source, op_types=options.dynamic_op_types,
                                                   nodes_to_exclude=request.nodes_to_exclude, subgraphs=subgraphs,
                                                   final=False)
        try:
            report = quantize.quantize_static_int8(
                source, out, request.calibration, method=options.calibration_method or request.calibration_method,
                per_channel=options.per_channel, nodes_to_exclude=request.nodes_to_exclude, op_types=options.op_types,
                extra_options=dict(options.extra_options))
        finally:
            if first is not None:
                source.unlink(missing_ok=True)
        if first is not None:
            report.notes[:0] = first.notes
        return report


def _graph(request: ExportRequest):
    import onnx

    return onnx.load(str(request.model_path), load_external_data=False).graph
