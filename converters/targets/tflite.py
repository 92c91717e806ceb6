"""The TFLite export target, via onnx2tf in the isolated ``tflite`` toolchain.

onnx2tf turns every input of rank >= 3 channel-last (NCHW -> NHWC, NCW -> NWC) and renames
tensors (``serving_default_<name>:0``). The target reads the artifact's real signature back
(with LiteRT inside the toolchain) and records, per tensor, the artifact name and the
permutation, so the runtime keeps taking the caller's original names and layout.

Precisions: fp32 (``*_float32``), fp16 (``*_float16``: FP16 weights, FP32 compute), int8 with
calibration data = full-integer (``*_integer_quant``: INT8 weights and activations, float I/O),
int8 without calibration data = dynamic-range (``*_dynamic_range_quant``: INT8 weights only).
"""

from __future__ import annotations

import json
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

TIMEOUT_S = 1800.0
# onnx2tf downloads this for 3-channel image inputs unless it already sits in the working dir.
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"

_INSPECT = r"""
import json, sys
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
it = Interpreter(model_path=sys.argv[1])
def d(x):
    return {"name": x["name"], "shape": [int(v) for v in x["shape"]], "dtype": x["dtype"].__name__}
print("EDGE_SDK_SIGNATURE " + json.dumps({"inputs": [d(x) for x in it.get_input_details()],
                                         "outputs": [d(x) for x in it.get_output_details()]}))
"""


def channel_last(rank: int) -> list[int] | None:
    """The permutation onnx2tf applies to an input of ``rank`` (None: unchanged)."""
    return [0, *range(2, rank), 1] if rank >= 3 else None


class TFLiteTarget(ExportTarget):
    target = Target.TFLITE
    backend = "tflite"

    def precisions(self) -> frozenset[Precision]:
        return frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

    def check_available(self) -> None:
        toolchains.require("tflite")

    def export(self, request: ExportRequest) -> ExportResult:
        if request.precision not in self.precisions():
            raise ConversionError(f"tflite: precision {request.precision} is not supported (use fp32, fp16 or int8)")
        for spec in request.inputs:
            if not all(isinstance(d, int) and d > 0 for d in spec.shape):
                raise ConversionError(f"tflite: input {spec.name!r} has a dynamic shape {spec.shape}; onnx2tf needs static shapes")
        toolchains.require("tflite")
        request.out_dir.mkdir(parents=True, exist_ok=True)
        out = request.out_dir / f"{request.variant_id}.tflite"
        notes: list[str] = []
        with tempfile.TemporaryDirectory(prefix="edge-sdk-onnx2tf-") as tmp:
            work = Path(tmp)
            shutil.copyfile(request.model_path, work / "model.onnx")
            _write_sample_file(work, request)
            args = ["-i", "model.onnx", "-o", "tf"]
            if request.precision is Precision.INT8:
                args += ["-oiqt", "-qt", "per-channel" if request.per_channel else "per-tensor"]
                args += _calibration_args(work, request)
                if not request.calibration:
                    notes.append("int8 dynamic-range (no calibration data): INT8 weights, float activations")
                else:
                    notes.append(f"int8 full-integer, calibrated on {len(request.calibration)} samples (NHWC)")
            run = toolchains.run("tflite", args, cwd=work, timeout=TIMEOUT_S)
            produced = work / "tf" / f"model_{_suffix(request)}.tflite"
            if run.returncode != 0:
                raise ConversionError(f"tflite: onnx2tf failed (exit {run.returncode}){_unsupported(run.output)}; "
                                      f"last output:\n{run.tail()}")
            if not produced.is_file() or produced.stat().st_size == 0:
                raise ConversionError(f"tflite: onnx2tf exited 0 but wrote no {produced.name}; last output:\n{run.tail()}")
            signature = _inspect(work, produced)
            inputs = _match(request.inputs, signature["inputs"], "input")
            outputs = _match(request.outputs, signature["outputs"], "output")
            shutil.move(str(produced), out)
        return ExportResult(files=[out], inputs=inputs, outputs=outputs, notes=notes,
                            nodes_quantized=None if request.precision is not Precision.INT8 else _count_quantized(out))


def _suffix(request: ExportRequest) -> str:
    if request.precision is Precision.FP32:
        return "float32"
    if request.precision is Precision.FP16:
        return "float16"
    return "integer_quant" if request.calibration else "dynamic_range_quant"


def _stacked(request: ExportRequest, spec: TensorSpec) -> np.ndarray:
    """All calibration samples of one input, in onnx2tf's (channel-last) layout."""
    arrays = []
    for k, feeds in enumerate(request.calibration):
        if spec.name not in feeds:
            raise ConversionError(f"tflite: calibration sample {k} has no input {spec.name!r} (has {sorted(feeds)})")
        array = np.asarray(feeds[spec.name], dtype=np.float32)
        if list(array.shape) != list(spec.shape):
            raise ConversionError(f"tflite: calibration sample {k} input {spec.name!r} has shape {list(array.shape)}, "
                                  f"expected {spec.shape} (the model's layout, e.g. NCHW)")
        arrays.append(array)
    stacked = np.concatenate(arrays, axis=0)
    perm = channel_last(stacked.ndim)
    return np.ascontiguousarray(stacked.transpose(perm)) if perm else stacked


def _calibration_args(work: Path, request: ExportRequest) -> list[str]:
    args = []
    for i, spec in enumerate(request.inputs):
        if request.calibration:
            data = _stacked(request, spec)
        else:
            # Dynamic-range quantization ignores activations, but onnx2tf's -oiqt path still wants
            # representative data; give it a few deterministic samples instead of its download.
            rng = np.random.default_rng(i)
            shape = [4, *spec.shape[1:]]
            data = rng.standard_normal(shape).astype(np.float32)
            perm = channel_last(data.ndim)
            data = np.ascontiguousarray(data.transpose(perm)) if perm else data
        path = work / f"calib_{i}.npy"
        np.save(path, data)
        args += ["-cind", spec.name, path.name, "0", "1"]  # mean 0, std 1: feeds are already normalised
    return args


def _write_sample_file(work: Path, request: ExportRequest) -> None:
    """Put onnx2tf's sample calibration file in its working dir, so it never downloads it."""
    image = next((s for s in request.inputs if len(s.shape) == 4 and s.shape[1] == 3), None)
    if image is not None and request.calibration:
        data = _stacked(request, image)  # [N, H, W, 3]
        rows = np.linspace(0, data.shape[1] - 1, 128).astype(int)
        cols = np.linspace(0, data.shape[2] - 1, 128).astype(int)
        data = data[:, rows][:, :, cols]
        data = np.resize(data, (20, 128, 128, 3)).astype(np.float32)
    else:
        data = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
    np.save(work / SAMPLE_FILE, data)


def _inspect(work: Path, tflite: Path) -> dict:
    script = work / "inspect_signature.py"
    script.write_text(_INSPECT, encoding="utf-8")
    run = toolchains.run("tflite", [script.name, str(tflite)], cwd=work, timeout=300, program="bin/python")
    line = next((ln for ln in run.output.splitlines() if ln.startswith("EDGE_SDK_SIGNATURE ")), None)
    if run.returncode != 0 or line is None:
        raise ConversionError(f"tflite: cannot read the signature of {tflite.name}; last output:\n{run.tail()}")
    return json.loads(line.split(" ", 1)[1])


def _norm(name: str) -> str:
    name = re.sub(r"^serving_default_", "", name)
    name = re.sub(r":\d+$", "", name)
    return re.sub(r"[^0-9A-Za-z]", "_", name).lower()


def _order(detail: dict) -> tuple[str, int]:
    """onnx2tf's outputs are ``PartitionedCall:<k>`` / ``Identity_<k>`` with k the model's output index."""
    m = re.search(r"[:_](\d+)$", detail["name"])
    return (re.sub(r"[:_]\d+$", "", detail["name"]), int(m.group(1)) if m else 0)


def _match(specs, details: list[dict], kind: str) -> list[TensorSpec]:
    """Pair the model's tensors with the artifact's: by name where onnx2tf kept it, else in index order.

    Inputs of rank >= 3 must come out channel-last (onnx2tf's rule); outputs may come out either
    way, and a channel-last output gets the inverse permutation so the caller sees the ONNX layout.
    """
    if len(specs) != len(details):
        raise ConversionError(f"tflite: the artifact has {len(details)} {kind}s, the model {len(specs)}")
    remaining = sorted(details, key=_order)
    result = []
    for spec in specs:
        shape = list(spec.shape)
        perm = channel_last(len(shape))
        last = [shape[p] for p in perm] if perm else shape

        def fits(d: dict, shape=shape, last=last) -> bool:
            return d["shape"] == last if kind == "input" else d["shape"] in (shape, last)

        named = [d for d in remaining if _norm(d["name"]) == _norm(spec.name) and fits(d)]
        ordered = [d for d in remaining if fits(d)]
        detail = (named or ordered or [None])[0]
        if detail is None:
            raise ConversionError(f"tflite: no artifact {kind} matches {spec.name!r} {shape} or its channel-last "
                                  f"form (artifact {kind}s: {[(d['name'], d['shape']) for d in remaining]})")
        remaining.remove(detail)
        # onnx2tf makes every rank >= 3 tensor channel-last, even when its shape reads the same both ways.
        if perm is None or (kind == "output" and detail["shape"] != last):
            transpose, layout = None, spec.layout
        elif kind == "input":
            transpose, layout = perm, _layout_name(len(shape))
        else:  # a channel-last output: the runtime turns it back with the inverse permutation
            transpose, layout = [int(i) for i in np.argsort(perm)], _layout_name(len(shape))
        result.append(spec.model_copy(update={"artifact_name": detail["name"], "transpose": transpose, "layout": layout}))
    return result


def _layout_name(rank: int) -> str:
    return {3: "NWC", 4: "NHWC", 5: "NDHWC"}.get(rank, "channel-last")


def _unsupported(output: str) -> str:
    ops = sorted(set(re.findall(r"(?:not supported|unsupported|NotImplemented)\w*[^\n]*?\b([A-Z][A-Za-z0-9]+)\b", output)))
    return f" (ops not expressible in TFLite: {', '.join(ops[:10])})" if ops else ""


def _count_quantized(path: Path) -> int | None:
    """Number of INT8 tensors in the flatbuffer (None when it cannot be read here)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    details = Interpreter(model_path=str(path)).get_tensor_details()
    return sum(1 for d in details if np.dtype(d["dtype"]) == np.int8)
