"""The OpenVINO IR export target: FP32, FP16 (compressed weights) and INT8 (NNCF post-training).

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
from pathlib import Path

import onnx

from ...errors import ConversionError, MissingDependencyError
from ...runtime.backends.openvino import import_openvino
from ...types import Precision, Target
from ..toollog import quiet
from .base import CalibrationMethod, ExportRequest, ExportResult, ExportTarget

_AUTO_NAME = re.compile(r"\b([A-Z][A-Za-z0-9]*)_(\d+)\b")  # OpenVINO's <OpType>_<instance counter>
_PRECISE = "precise_0"  # rt_info key of ov::disable_fp16_compression (saved as DisablePrecisionConversion)


class OpenVINOTarget(ExportTarget):
    target = Target.OPENVINO
    backend = "openvino"

    def precisions(self) -> frozenset[Precision]:
        return frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

    def check_available(self) -> None:
        import_openvino()

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
                         f"on {len(request.calibration)} calibration samples")
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
    if request.nodes_to_exclude:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(request.nodes_to_exclude), validate=False)
    if not request.per_channel:
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    estimator = range_estimator(request.calibration_method)
    if estimator is not None:
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(activations_range_estimator_params=estimator)
    try:
        with quiet():
            quantized = nncf.quantize(model, dataset, **kwargs)
    except Exception as exc:  # NNCF raises many types; all mean "this model did not quantize"
        raise ConversionError(f"openvino: NNCF quantization failed: {_first_line(exc)}") from None
    count = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return quantized, count


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

