"""The ONNX export target: FP32 (as checked), FP16, INT8 static QDQ, mixed INT8/FP32."""

from __future__ import annotations

import shutil

from ...errors import ConversionError
from ...types import Precision, Target
from .. import quantize
from .base import ExportRequest, ExportResult, ExportTarget


class OnnxTarget(ExportTarget):
    target = Target.ONNX
    backend = "onnxruntime"

    def precisions(self) -> frozenset[Precision]:
        return frozenset(Precision)

    def export(self, request: ExportRequest) -> ExportResult:
        request.out_dir.mkdir(parents=True, exist_ok=True)
        out = request.out_dir / f"{request.variant_id}.onnx"
        if request.precision == Precision.FP32:
            shutil.copyfile(request.model_path, out)
            report = quantize.QuantizeReport(nodes_quantized=0)
        elif request.precision == Precision.FP16:
            report = quantize.to_fp16(request.model_path, out)
        elif request.precision in (Precision.INT8, Precision.MIXED):
            if not request.calibration:
                # Without calibration data only dynamic quantization is possible; the benchmark
                # gate usually rejects it on conv nets (6-7x slower than FP32 on x86).
                report = quantize.quantize_dynamic_int8(request.model_path, out)
            else:
                report = quantize.quantize_static_int8(
                    request.model_path, out, request.calibration, method=request.calibration_method,
                    per_channel=request.per_channel, nodes_to_exclude=request.nodes_to_exclude)
        else:  # pragma: no cover - Precision is a closed set
            raise ConversionError(f"onnx: unsupported precision {request.precision}")
        return ExportResult(files=[out], inputs=list(request.inputs), outputs=list(request.outputs),
                            notes=report.notes, nodes_quantized=report.nodes_quantized,
                            nodes_kept_fp32=report.nodes_kept_fp32)
