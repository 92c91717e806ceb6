"""The OpenVINO IR export target: FP32, FP16 (compressed weights) and INT8 (NNCF post-training).

OpenVINO and NNCF run in the SDK's own environment (extra ``openvino``): both work with numpy 2
and our onnx, so no isolated toolchain is needed. Telemetry is off (see ``import_openvino``).
"""

from __future__ import annotations

from ...errors import ConversionError, MissingDependencyError
from ...runtime.backends.openvino import import_openvino
from ...types import Precision, Target
from ..toollog import quiet
from .base import ExportRequest, ExportResult, ExportTarget


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
        request.out_dir.mkdir(parents=True, exist_ok=True)
        xml = request.out_dir / f"{request.variant_id}.xml"
        bin_ = xml.with_suffix(".bin")
        notes: list[str] = []
        try:
            model = ov.convert_model(str(request.model_path))
        except Exception as exc:  # OpenVINO raises its own RuntimeError/OpConversionFailure types
            raise ConversionError(f"openvino: cannot convert {request.model_path.name}: {_first_lines(exc)}") from None
        nodes_quantized = 0
        if request.precision is Precision.INT8:
            if not request.calibration:
                raise ConversionError("openvino int8 needs calibration data (NNCF post-training quantization)")
            model, nodes_quantized = _quantize(model, request)
            notes.append(f"NNCF INT8 on {len(request.calibration)} calibration samples")
        try:
            # save_model compresses weights to FP16 by default; only the fp16 variant wants that.
            ov.save_model(model, str(xml), compress_to_fp16=request.precision is Precision.FP16)
        except Exception as exc:
            for f in (xml, bin_):
                f.unlink(missing_ok=True)
            raise ConversionError(f"openvino: cannot save IR: {_first_lines(exc)}") from None
        return ExportResult(files=[xml, bin_], inputs=list(request.inputs), outputs=list(request.outputs),
                            notes=notes, nodes_quantized=nodes_quantized,
                            nodes_kept_fp32=list(request.nodes_to_exclude))


def _quantize(model, request: ExportRequest):
    try:
        import nncf
    except ImportError:
        raise MissingDependencyError("nncf", "openvino", "OpenVINO INT8 quantization") from None
    names = [spec.name for spec in request.inputs]
    # OpenVINO keeps ONNX tensor names, so calibration feeds map by name in the model's input order.
    order = [next(iter(p.get_names() & set(names)), None) for p in model.inputs]
    if None in order:
        raise ConversionError(f"openvino: model inputs {[sorted(p.get_names()) for p in model.inputs]} do not match {names}")
    dataset = nncf.Dataset(list(request.calibration), lambda feeds: {n: feeds[n] for n in order})
    ignored = nncf.IgnoredScope(names=list(request.nodes_to_exclude), validate=False) if request.nodes_to_exclude else None
    kwargs = {"subset_size": len(request.calibration)}
    if ignored is not None:
        kwargs["ignored_scope"] = ignored
    if not request.per_channel:
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE
    try:
        with quiet():
            quantized = nncf.quantize(model, dataset, **kwargs)
    except Exception as exc:  # NNCF raises many types; all mean "this model did not quantize"
        raise ConversionError(f"openvino: NNCF quantization failed: {_first_lines(exc)}") from None
    count = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return quantized, count


def _first_lines(exc: BaseException, n: int = 6) -> str:
    return " | ".join(str(exc).strip().splitlines()[:n])
