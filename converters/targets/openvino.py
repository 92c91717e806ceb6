"""The OpenVINO IR export target: FP32, FP16 (compressed weights) and INT8 (NNCF post-training).

INT8 recipes (:data:`INT8_RECIPES`): NNCF's plain ``quantize``; when that misses the accuracy
budget, quantization of Convolution/MatMul only; then ``quantize_with_accuracy_control``, which
reverts the ops that cost most to FP32, judged by the gate's own measure on the validation samples.

OpenVINO and NNCF run in the SDK's own environment (extra ``openvino``): both work with numpy 2
and our onnx, so no isolated toolchain is needed. Telemetry is off (see ``import_openvino``).

Every IR is reproducible: OpenVINO names the nodes it creates after a process-wide counter
(``Constant_43649``), so those names are renumbered in graph order before saving, NNCF sees every
calibration sample (no random subset), and nothing time- or path-dependent is written.

An FP32 IR says so itself: OpenVINO's CPU plugin computes in bf16 by default where the CPU has it
(AVX-512 BF16/AMX) unless the caller sets ``INFERENCE_PRECISION_HINT``, and a model converted as
FP32 can come out wrong that way. Each op of an FP32 IR is marked precision-sensitive (OpenVINO's own
``disable_fp16_compression`` attribute, which its CPU plugin also honours for bf16) and the model's
``runtime_options`` record ``INFERENCE_PRECISION_HINT=f32`` for any consumer that reads them.
(Measured on OpenVINO 2026.4: Convolution and most ops then stay f32 under a plain ``compile_model``;
a MatMul the CPU plugin rewrites into a FullyConnected can lose the mark and still run bf16, so
the runtime backend keeps setting the f32 hint itself.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ...errors import ConversionError, MissingDependencyError
from ...runtime.backends.openvino import import_openvino
from ...types import Precision, Target
from ..toollog import quiet
from .base import AccuracyCheck, CalibrationMethod, ExportRequest, ExportResult, ExportTarget, Recipe, When

_AUTO_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*)_(\d+)\b")  # OpenVINO's <OpType>_<instance counter>
_WEIGHTED = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                       "MatMul"})
_PRECISE = "precise_0"  # rt_info key of ov::disable_fp16_compression (saved as DisablePrecisionConversion)


@dataclass(frozen=True)
class OpenVINOInt8:
    """How an INT8 recipe runs NNCF: which ops it may quantize, and whether with accuracy control."""

    weighted_ops_only: bool = False  # quantize Convolution/MatMul inputs only (onnx's qdq-conv-matmul)
    accuracy_control: bool = False  # quantize_with_accuracy_control instead of quantize


INT8_RECIPES = (
    # Without calibration data the plain recipe runs anyway, so the variant's reason says what is missing.
    Recipe("int8", Precision.INT8, "NNCF post-training quantization", options=OpenVINOInt8()),
    # NNCF also quantizes the inputs of Add, Multiply, Concat...: on magika that costs 24 points
    # top-1, against none with Convolution/MatMul alone, at the same 0.25x size (all its weights
    # are in those ops; a transformer's embedding Gather stays FP32 this way).
    Recipe("int8-conv-matmul", Precision.INT8, "NNCF post-training quantization of Convolution/MatMul only",
           when=When.FALLBACK, needs_calibration=True, options=OpenVINOInt8(weighted_ops_only=True)),
    Recipe("nncf-accuracy-control", Precision.INT8,
           "NNCF quantize_with_accuracy_control of Convolution/MatMul: the ops that cost most accuracy reverted "
           "to FP32 until the validation drop meets the budget", when=When.FALLBACK, needs_calibration=True,
           recovers_accuracy=True, options=OpenVINOInt8(weighted_ops_only=True, accuracy_control=True)),
)


class OpenVINOTarget(ExportTarget):
    target = Target.OPENVINO
    backend = "openvino"

    def precisions(self) -> frozenset[Precision]:
        return frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

    def check_available(self) -> None:
        import_openvino()

    def recipes(self, precision: Precision) -> tuple[Recipe, ...]:
        return INT8_RECIPES if precision is Precision.INT8 else tuple(super().recipes(precision))

    def export(self, request: ExportRequest) -> ExportResult:
        ov = import_openvino()
        if request.precision not in self.precisions():
            raise ConversionError(f"openvino: precision {request.precision} is not supported (use fp32, fp16 or int8)")
        if request.precision is Precision.INT8:
            if not request.calibration:
                raise ConversionError("openvino int8 needs calibration data (NNCF post-training quantization)")
            range_estimator(request.calibration_method)  # an unsupported method fails before any work
        request.out_dir.mkdir(parents=True, exist_ok=True)
        xml = request.out_dir / f"{request.variant_id}.xml"
        bin_ = xml.with_suffix(".bin")
        notes: list[str] = []
        try:
            model = ov.convert_model(str(request.model_path))
        except Exception as exc:  # OpenVINO raises its own RuntimeError/OpConversionFailure types
            raise ConversionError(f"openvino: cannot convert {request.model_path.name}: {_conversion_failure(exc)}") from None
        source = onnx.load(str(request.model_path), load_external_data=False)
        nodes_quantized = 0
        if request.precision is Precision.INT8:
            transformer = is_transformer(source.graph)
            model, nodes_quantized = _quantize(model, request, transformer)
            notes.append(f"NNCF INT8 ({request.calibration_method.value}{', transformer model type' if transformer else ''}) "
                         f"on {len(request.calibration)} calibration samples"
                         + (f", accuracy control on {len(request.accuracy.samples)} validation samples"
                            if request.accuracy is not None else ""))
        elif request.precision is Precision.FP32:
            for op in model.get_ops():
                op.get_rt_info()[_PRECISE] = ""
            model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
        canonical_names(model, _onnx_names(source.graph))
        try:
            # save_model compresses weights to FP16 by default; only the fp16 variant wants that.
            ov.save_model(model, str(xml), compress_to_fp16=request.precision is Precision.FP16)
        except Exception as exc:
            for f in (xml, bin_):
                f.unlink(missing_ok=True)
            raise ConversionError(f"openvino: cannot save IR: {_first_line(exc)}") from None
        return ExportResult(files=[xml, bin_], inputs=list(request.inputs), outputs=list(request.outputs),
                            notes=notes, nodes_quantized=nodes_quantized,
                            nodes_kept_fp32=list(request.nodes_to_exclude))


def is_transformer(graph: onnx.GraphProto) -> bool:
    """Attention blocks (Softmax between MatMuls, more MatMul than Conv): NNCF's transformer model type."""
    ops = [node.op_type for node in graph.node]
    return "Softmax" in ops and ops.count("MatMul") >= 2 and ops.count("MatMul") > ops.count("Conv")


def range_estimator(method: CalibrationMethod):
    """NNCF's activation range estimator for ``method`` (None: NNCF's default min/max)."""
    if method is CalibrationMethod.MINMAX:
        return None
    if method is CalibrationMethod.PERCENTILE:
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        return RangeEstimatorParametersSet.MEAN_QUANTILE
    raise ConversionError(f"openvino int8: NNCF has no {method.value} calibration; use --calibration-method minmax or percentile")


def _quantize(model, request: ExportRequest, transformer: bool):
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    except ImportError:
        raise MissingDependencyError("nncf", "openvino", "OpenVINO INT8 quantization") from None
    names = [spec.name for spec in request.inputs]
    # OpenVINO keeps ONNX tensor names, so calibration feeds map by name in the model's input order.
    order = [next(iter(p.get_names() & set(names)), None) for p in model.inputs]
    if None in order:
        raise ConversionError(f"openvino: model inputs {[sorted(p.get_names()) for p in model.inputs]} do not match {names}")
    dataset = nncf.Dataset(list(request.calibration), lambda feeds: {n: feeds[n] for n in order})
    kwargs: dict = {"subset_size": len(request.calibration)}  # every sample: no random subset, same IR each run
    options = request.recipe.options if request.recipe is not None else None
    options = options if isinstance(options, OpenVINOInt8) else OpenVINOInt8()
    if options.accuracy_control and request.accuracy is None:
        raise ConversionError("openvino: accuracy control needs validation samples that run one by one "
                              "(not a streamed --state)")
    ignored_types = sorted({op.get_type_name() for op in model.get_ops()} - _WEIGHTED) if options.weighted_ops_only else []
    if request.nodes_to_exclude or ignored_types:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(request.nodes_to_exclude), types=ignored_types,
                                                    validate=False)
    if not request.per_channel:
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    estimator = range_estimator(request.calibration_method)
    advanced = None if estimator is None else AdvancedQuantizationParameters(activations_range_estimator_params=estimator)
    try:
        with quiet():
            if options.accuracy_control:
                quantized = _quantize_with_accuracy_control(nncf, model, dataset, order, request, advanced, kwargs)
            else:
                quantized = nncf.quantize(model, dataset, **kwargs, advanced_parameters=advanced)
    except Exception as exc:  # NNCF raises many types; all mean "this model did not quantize"
        raise ConversionError(f"openvino: NNCF quantization failed: {_first_line(exc)}") from None
    count = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return quantized, count


def _quantize_with_accuracy_control(nncf, model, calibration, order: list[str], request: ExportRequest, advanced,
                                    kwargs: dict):
    """NNCF's accuracy control judged by the gate's own measure (``check.drop``, the task metric
    with its margin) on the validation samples. Items are sample indices, so the measure of a
    subset NNCF ranks on keeps FP32's outputs for the other samples and the task metric still sees
    every sample in order.

    Ops are ranked by that measure too (NNCF's metric mode: the per-item values are floats), not
    by how far reverting them moves the outputs (its NMSE mode): on magika NMSE ranked last the
    one Convolution that made every changed prediction, so NNCF reverted the two harmless MatMuls
    first, then gave up with nothing quantized. The per-item value, minus the relative squared
    error of the item's outputs against FP32's, only picks which items NNCF ranks on: the most changed."""
    check: AccuracyCheck = request.accuracy
    samples, names = check.samples, {spec.name for spec in request.outputs}
    validation = nncf.Dataset(list(range(len(samples))), lambda i: {n: samples[i][n] for n in order})

    def validation_fn(compiled, items):
        ports = list(compiled.outputs)
        outputs = {}
        for i in items:
            result = compiled({n: samples[i][n] for n in order})
            outputs[i] = {next(iter(p.get_names() & names)): np.asarray(result[p]) for p in ports}
        # NNCF wants a metric where higher is better, and divides by FP32's (its relative drop,
        # computed even when unused): 1 minus the drop, in metric units; FP32 scores about 1.
        return 1.0 - check.drop(outputs) / 100.0, [-_relative_error(out, check.reference[i]) for i, out in outputs.items()]

    return nncf.quantize_with_accuracy_control(
        model, calibration, validation, validation_fn, max_drop=check.max_drop / 100.0,
        drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **kwargs)


def _relative_error(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Squared error of the float outputs against FP32's, over FP32's energy."""
    floats = [k for k in reference if np.asarray(reference[k]).dtype.kind == "f" and k in outputs]
    error = sum(float(np.sum((np.asarray(outputs[k], np.float64) - reference[k]) ** 2)) for k in floats)
    energy = sum(float(np.sum(np.asarray(reference[k], np.float64) ** 2)) for k in floats)
    return error / max(energy, 1e-30)


def canonical_names(model, keep: set[str]) -> None:
    """Renumber OpenVINO's counter-based names (``Constant_43649``) in graph order; ONNX names stay."""
    numbers: dict[str, int] = {}

    def canon(name: str) -> str:
        if name in keep:
            return name
        return _AUTO_NAME.sub(lambda m: m.group(0) if m.group(0) in keep
                              else f"{m.group(1)}_#{numbers.setdefault(m.group(0), len(numbers))}", name)

    for op in model.get_ordered_ops():
        op.set_friendly_name(canon(op.get_friendly_name()))
        for output in op.outputs():
            names = output.get_names()
            renamed = {canon(n) for n in names}
            if renamed != names:
                output.get_tensor().set_names(renamed)


def _onnx_names(graph: onnx.GraphProto) -> set[str]:
    names = {node.name for node in graph.node} | {o for node in graph.node for o in node.output}
    return names | {v.name for v in (*graph.input, *graph.output, *graph.initializer)}


def _conversion_failure(exc: BaseException) -> str:
    """OpenVINO's frontend report in one line: the ops it could not convert and the first cause,
    not its first line (a "Check 'false' failed at <source file>" banner)."""
    text = str(exc)
    failed = re.search(r"Conversion is failed for: ([^\n]+)", text)
    if failed is None:
        return _first_line(exc)
    causes = [line.strip() for line in text.splitlines()
              if line.strip() and not re.match(r"(Check '|While validating|\[ONNX Frontend\]|-- |FrontEnd API|Model wasn't|Summary:)",
                                               line.strip())]
    cause = f" ({causes[0][:160]})" if causes else ""
    return f"its ONNX frontend could not convert {failed.group(1).strip()}{cause}"[:300]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]

