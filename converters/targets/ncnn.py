"""The NCNN export target, via the pnnx binary of the ``ncnn`` toolchain (no torch needed).

``pnnx model.onnx inputshape=[..] fp16=0|1 ncnnparam=.. ncnnbin=..`` writes the ``.param``/``.bin``
pair; pnnx names blobs ``in0..``/``out0..`` in the model's input/output order, which the result
records as each tensor's ``artifact_name``. NCNN computes in CHW without a batch axis: the
backend drops and restores the leading batch-1 axis, so the caller's layout is unchanged.

INT8 needs ncnn's ``ncnn2table``/``ncnn2int8`` tools, which are in neither the pip wheel nor
Debian 12: they are used when on PATH or in ``$EDGE_SDK_NCNN_TOOLS``; otherwise INT8 is reported
as unavailable with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ...errors import ConversionError
from ...manifest import TensorSpec
from ...types import Precision, Target
from .. import toolchains
from .base import ExportRequest, ExportResult, ExportTarget

_DTYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8"}
TIMEOUT_S = 900.0


def ncnn_int8_tools() -> tuple[Path, Path] | None:
    """``(ncnn2table, ncnn2int8)`` from ``$EDGE_SDK_NCNN_TOOLS`` or PATH, or None."""
    configured = os.environ.get("EDGE_SDK_NCNN_TOOLS")
    found = []
    for tool in ("ncnn2table", "ncnn2int8"):
        path = shutil.which(tool, path=configured) if configured else shutil.which(tool)
        if path is None:
            return None
        found.append(Path(path))
    return found[0], found[1]


class NcnnTarget(ExportTarget):
    target = Target.NCNN
    backend = "ncnn"

    def precisions(self) -> frozenset[Precision]:
        base = {Precision.FP32, Precision.FP16}
        return frozenset(base | {Precision.INT8}) if ncnn_int8_tools() else frozenset(base)

    def unavailable_reason(self, precision: Precision) -> str | None:
        if precision is Precision.INT8 and precision not in self.precisions():
            return ("ncnn int8 skipped: ncnn2table/ncnn2int8 are not on PATH (they ship in neither the ncnn "
                    "wheel nor Debian 12; build ncnn's tools and set EDGE_SDK_NCNN_TOOLS to their directory)")
        return super().unavailable_reason(precision)

    def check_available(self) -> None:
        toolchains.require("ncnn")

    def export(self, request: ExportRequest) -> ExportResult:
        reason = self.unavailable_reason(request.precision)
        if reason:
            raise ConversionError(reason)
        shapes = []
        for spec in request.inputs:
            if not all(isinstance(d, int) and d > 0 for d in spec.shape):
                raise ConversionError(f"ncnn: input {spec.name!r} has a dynamic shape {spec.shape}; pnnx needs static shapes")
            if spec.shape and spec.shape[0] != 1:
                raise ConversionError(f"ncnn: input {spec.name!r} has batch {spec.shape[0]}; ncnn runs batch 1 only")
            code = _DTYPES.get(spec.dtype)
            if code is None:
                raise ConversionError(f"ncnn: input {spec.name!r} has dtype {spec.dtype}, which pnnx cannot take")
            shapes.append(f"[{','.join(str(d) for d in spec.shape)}]{code}")
        request.out_dir.mkdir(parents=True, exist_ok=True)
        param = request.out_dir / f"{request.variant_id}.ncnn.param"
        bin_ = request.out_dir / f"{request.variant_id}.ncnn.bin"
        notes = []
        # pnnx writes a dozen side files next to its input: work in a scratch dir, move only the pair.
        with tempfile.TemporaryDirectory(prefix="edge-sdk-pnnx-") as tmp:
            work = Path(tmp)
            shutil.copyfile(request.model_path, work / "model.onnx")
            fp16 = 1 if request.precision is Precision.FP16 else 0
            run = toolchains.run("ncnn", ["model.onnx", f"inputshape={','.join(shapes)}", f"fp16={fp16}",
                                          "ncnnparam=model.ncnn.param", "ncnnbin=model.ncnn.bin"], cwd=work, timeout=TIMEOUT_S)
            out_param, out_bin = work / "model.ncnn.param", work / "model.ncnn.bin"
            if run.returncode != 0:
                raise ConversionError(f"ncnn: pnnx failed (exit {run.returncode}){_unsupported(run.output)}; last output:\n{run.tail()}")
            if not out_param.is_file() or not out_bin.is_file() or out_param.stat().st_size == 0:
                raise ConversionError(f"ncnn: pnnx exited 0 but wrote no .param/.bin; last output:\n{run.tail()}")
            inputs, outputs = _blob_names(out_param.read_text(encoding="utf-8"))
            if len(inputs) != len(request.inputs) or len(outputs) != len(request.outputs):
                raise ConversionError(f"ncnn: pnnx produced inputs {inputs} / outputs {outputs} for a model with "
                                      f"{[s.name for s in request.inputs]} / {[s.name for s in request.outputs]}"
                                      f"{_unsupported(run.output)}")
            if request.precision is Precision.INT8:
                out_param, out_bin = _int8(work, out_param, out_bin, request, inputs)
                notes.append(f"ncnn2table/ncnn2int8 on {len(request.calibration)} calibration samples")
            shutil.move(str(out_param), param)
            shutil.move(str(out_bin), bin_)
        return ExportResult(
            files=[param, bin_],
            inputs=[s.model_copy(update={"artifact_name": n, "layout": _layout(s)}) for s, n in zip(request.inputs, inputs)],
            outputs=[s.model_copy(update={"artifact_name": n}) for s, n in zip(request.outputs, outputs)],
            notes=notes,
        )


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
    ops = sorted(set(re.findall(r"(?:unsupported|not supported|ignore)\w*\s+(?:op\s+)?(\S+)", output, flags=re.I)))
    return f" (ops not expressible in ncnn: {', '.join(ops[:10])})" if ops else ""


def _int8(work: Path, param: Path, bin_: Path, request: ExportRequest, blob_inputs: list[str]) -> tuple[Path, Path]:
    """Calibrate with ncnn2table on .npy feeds (batch axis dropped), then ncnn2int8."""
    import subprocess

    tools = ncnn_int8_tools()
    if tools is None or not request.calibration:
        raise ConversionError("ncnn int8 needs ncnn2table/ncnn2int8 and calibration data")
    ncnn2table, ncnn2int8 = tools
    lists = []
    for i, spec in enumerate(request.inputs):
        listing = work / f"calib{i}.txt"
        paths = []
        for k, feeds in enumerate(request.calibration):
            path = work / f"calib{i}_{k}.npy"
            np.save(path, np.asarray(feeds[spec.name], dtype=np.float32)[0])
            paths.append(str(path))
        listing.write_text("\n".join(paths) + "\n", encoding="utf-8")
        lists.append(str(listing))
    shapes = ",".join("[" + ",".join(str(d) for d in reversed(s.shape[1:])) + "]" for s in request.inputs)
    table = work / "model.table"
    steps = [[str(ncnn2table), str(param), str(bin_), ",".join(lists), str(table), f"shape={shapes}", "type=1",
              "method=kl" if request.calibration_method.value == "entropy" else "method=aciq", "thread=1"],
             [str(ncnn2int8), str(param), str(bin_), str(work / "int8.param"), str(work / "int8.bin"), str(table)]]
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"ncnn int8: {Path(cmd[0]).name} timed out after {TIMEOUT_S:.0f}s") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise ConversionError(f"ncnn int8: {Path(cmd[0]).name} failed (exit {proc.returncode}):\n{tail}")
    param8, bin8 = work / "int8.param", work / "int8.bin"
    if not param8.is_file() or param8.stat().st_size == 0 or not bin8.is_file():
        raise ConversionError(f"ncnn int8: {ncnn2int8.name} exited 0 but wrote no int8.param/int8.bin")
    return param8, bin8
