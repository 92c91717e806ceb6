"""The NCNN export target, via the pnnx binary of the ``ncnn`` toolchain (no torch needed).

``pnnx model.onnx inputshape=[..] fp16=0|1 ncnnparam=.. ncnnbin=..`` writes the ``.param``/``.bin``
pair; pnnx names blobs ``in0..``/``out0..`` in the model's input/output order, which the result
records as each tensor's ``artifact_name``. pnnx takes every input's first axis as the batch axis
and ncnn computes without one (CHW): the backend drops and restores that leading 1, so the
caller's layout is unchanged.

INT8 is ncnn's own format (INT8 weights per output channel and an input scale per Convolution,
ConvolutionDepthWise and InnerProduct), made from the FP32 pair and the calibration feeds by
:mod:`.ncnn_int8` with the ``ncnn`` package itself. Its recipes differ in how activation ranges
are taken, which no one method gets right for every model (CenterFace, held-out F1: minmax -2.4
points, percentile +1.2, KL 0.0):

1. ``int8``: ``--calibration-method`` (minmax by default);
2. ``int8-percentile``: the 99.99th percentile of ``|x|``;
3. ``int8-kl``: the KL-divergence threshold of ncnn2table;
4. ``int8-keep-ends``: percentile, with the first layers (reading the inputs) and the last ones
   (no quantizable layer after them: the heads) kept FP32, a fallback after an accuracy miss.

2 and 3 are skipped when ``--calibration-method`` already names their method. All candidates are
the same size and speed, so the search keeps the most accurate on the validation samples.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConversionError
from ...manifest import TensorSpec
from ...types import Precision, Target
from .. import toolchains
from . import ncnn_int8
from .base import CalibrationMethod, ExportRequest, ExportResult, ExportTarget, Recipe, When

_DTYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8"}
TIMEOUT_S = 900.0


@dataclass(frozen=True)
class NcnnInt8:
    """How one INT8 recipe calibrates: its range method (None: the request's) and whether the ends stay FP32."""

    calibration_method: CalibrationMethod | None = None
    keep_ends: bool = False


INT8_RECIPES = (
    # Without calibration data the plain recipe runs anyway, so the variant's reason says what is missing.
    Recipe("int8", Precision.INT8, "ncnn INT8, activation ranges by --calibration-method", options=NcnnInt8()),
    Recipe("int8-percentile", Precision.INT8, "ncnn INT8, activation ranges at the 99.99th percentile",
           needs_calibration=True, options=NcnnInt8(CalibrationMethod.PERCENTILE)),
    Recipe("int8-kl", Precision.INT8, "ncnn INT8, KL-divergence activation ranges (ncnn2table's)",
           needs_calibration=True, options=NcnnInt8(CalibrationMethod.ENTROPY)),
    Recipe("int8-keep-ends", Precision.INT8, "ncnn INT8 (percentile) with the first and last layers kept FP32",
           when=When.FALLBACK, needs_calibration=True, recovers_accuracy=True,
           options=NcnnInt8(CalibrationMethod.PERCENTILE, keep_ends=True)),
)


class NcnnTarget(ExportTarget):
    target = Target.NCNN
    backend = "ncnn"

    def precisions(self) -> frozenset[Precision]:
        return frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

    def check_available(self) -> None:
        toolchains.require("ncnn")

    def recipes(self, precision: Precision) -> tuple[Recipe, ...]:
        return INT8_RECIPES if precision is Precision.INT8 else tuple(super().recipes(precision))

    def export(self, request: ExportRequest) -> ExportResult:
        if request.precision not in self.precisions():
            raise ConversionError(f"ncnn: precision {request.precision.value} is not supported (use fp32, fp16 or int8)")
        if request.precision is Precision.INT8 and not request.calibration:
            raise ConversionError("ncnn int8 needs calibration data (activation ranges for ncnn's INT8 layers)")
        shapes = [_input_shape(spec) for spec in request.inputs]
        request.out_dir.mkdir(parents=True, exist_ok=True)
        param = request.out_dir / f"{request.variant_id}.ncnn.param"
        bin_ = request.out_dir / f"{request.variant_id}.ncnn.bin"
        notes: list[str] = []
        nodes_quantized = None
        # pnnx writes a dozen side files next to its input: work in a scratch dir, move only the pair.
        with tempfile.TemporaryDirectory(prefix="edge-sdk-pnnx-") as tmp:
            work = Path(tmp)
            shutil.copyfile(request.model_path, work / "model.onnx")
            fp16 = 1 if request.precision is Precision.FP16 else 0
            run = toolchains.run("ncnn", ["model.onnx", f"inputshape={','.join(shapes)}", f"fp16={fp16}",
                                          "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin"], cwd=work, timeout=TIMEOUT_S)
            out_param, out_bin = work / "model.ncnn.param", work / "model.ncnn.bin"
            if run.returncode != 0:
                raise ConversionError(f"ncnn: {run.failure('pnnx', _unsupported(run.output))}", log=run.output)
            if not out_param.is_file() or not out_bin.is_file() or out_param.stat().st_size == 0:
                raise ConversionError("ncnn: pnnx exited 0 but wrote no .param/.bin", log=run.output)
            inputs, outputs = _blob_names(out_param.read_text(encoding="utf-8"))
            if len(inputs) != len(request.inputs) or len(outputs) != len(request.outputs):
                raise ConversionError(f"ncnn: pnnx produced inputs {inputs} / outputs {outputs} for a model with "
                                      f"{[s.name for s in request.inputs]} / {[s.name for s in request.outputs]}",
                                      log=run.output)
            if request.precision is Precision.INT8:
                options = request.recipe.options if request.recipe is not None else None
                options = options if isinstance(options, NcnnInt8) else NcnnInt8()
                method = options.calibration_method or request.calibration_method
                param_text = out_param.read_text(encoding="utf-8")
                kept = ncnn_int8.end_layers(param_text) if options.keep_ends else ()
                quantized = ncnn_int8.quantize(out_param, out_bin, request.calibration,
                                               {s.name: blob for s, blob in zip(request.inputs, inputs)},
                                               method, exclude=kept)
                out_param.write_text(quantized.param_text, encoding="utf-8")
                out_bin.write_bytes(quantized.weights)
                notes.append(f"ncnn int8 ({method.value}) on {len(request.calibration)} calibration "
                             f"samples: {len(quantized.quantized)} layers INT8")
                if kept:
                    notes.append(f"kept fp32 (first and last layers): {', '.join(kept)}")
                notes.extend(f"kept fp32: {why}" for why in quantized.skipped)
                nodes_quantized = len(quantized.quantized)
            # Loading every layer with ncnn's own loaders proves the pair loads: pnnx can write layers
            # (an LSTM without its sizes) that ncnn refuses, and ncnn crashes when such a net is run.
            try:
                ncnn_int8.layer_bytes(out_param, out_bin.read_bytes())
            except ConversionError as exc:
                cause = _unsupported(run.output) or str(exc).removeprefix("ncnn int8: ")
                raise ConversionError(f"ncnn: pnnx wrote a model ncnn cannot load ({cause})", log=run.output) from None
            shutil.move(str(out_param), param)
            shutil.move(str(out_bin), bin_)
        return ExportResult(
            files=[param, bin_],
            inputs=[s.model_copy(update={"artifact_name": n, "layout": _layout(s)}) for s, n in zip(request.inputs, inputs)],
            outputs=[s.model_copy(update={"artifact_name": n}) for s, n in zip(request.outputs, outputs)],
            notes=notes,
            nodes_quantized=nodes_quantized,
        )


def _input_shape(spec: TensorSpec) -> str:
    """pnnx's ``inputshape`` entry for one input, or why ncnn cannot take it."""
    if not all(isinstance(d, int) and d > 0 for d in spec.shape):
        raise ConversionError(f"ncnn: input {spec.name!r} has a dynamic shape {spec.shape}; pnnx needs static shapes")
    if spec.shape and spec.shape[0] != 1:
        # A recurrent state [layers, batch, hidden] has no batch axis in front: say what ncnn needs, not "batch".
        raise ConversionError(f"ncnn: input {spec.name!r} has shape {spec.shape}: pnnx reads an input's first axis as "
                              f"the batch axis, which ncnn drops, so it must be 1 (here {spec.shape[0]})")
    code = _DTYPES.get(spec.dtype)
    if code is None:
        raise ConversionError(f"ncnn: input {spec.name!r} has dtype {spec.dtype}, which pnnx cannot take")
    return f"[{','.join(str(d) for d in spec.shape)}]{code}"


def _layout(spec: TensorSpec) -> str | None:
    return "NCHW" if len(spec.shape) == 4 else spec.layout


def _blob_names(param_text: str) -> tuple[list[str], list[str]]:
    """pnnx's input blobs (``in0``..) and output blobs (``out0``..), in index order."""
    blobs = set(re.findall(r"\b((?:in|out)\d+)\b", param_text))

    def ordered(prefix: str) -> list[str]:
        return sorted((b for b in blobs if re.fullmatch(prefix + r"\d+", b)), key=lambda b: int(b[len(prefix):]))

    return ordered("in"), ordered("out")


def _unsupported(output: str) -> str:
    """Name the ops pnnx could not convert, when its log says so."""
    gather = re.search(r"running Gather node\. Name:'([^']+)' Status Message: indices element out of data bounds", output)
    if gather:  # pnnx runs the model on random inputs to trace shapes; token ids beyond a table crash it
        return (f"its trial run on random integer inputs indexes past an embedding table ({gather.group(1)}); "
                "pnnx cannot be given real token ids")
    ops = sorted(set(re.findall(r"(?:unsupported|not supported|ignore)\w*\s+(?:op\s+)?(\S+)", output, flags=re.I)))
    return f"ops not expressible in ncnn: {', '.join(ops[:10])}" if ops else ""
