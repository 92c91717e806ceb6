"""The TFLite export target, via onnx2tf in the isolated ``tflite`` toolchain.

onnx2tf turns every input of rank >= 3 channel-last (NCHW -> NHWC, NCW -> NWC) and renames
tensors (``serving_default_<name>:0``). The target reads the artifact's real signature back
(with LiteRT inside the toolchain) and records, per tensor, the artifact name and the
permutation, so the runtime keeps taking the caller's original names and layout.

Precisions: fp32 (``*_float32``), fp16 (``*_float16``: FP16 weights, FP32 compute). INT8 (recipes
``int8``, then ``int8-dynamic-range`` as a fallback while nothing is accepted) is made
from onnx2tf's SavedModel by TensorFlow's own converter, run in the toolchain (onnx2tf's quantizer
casts every calibration input to float, which breaks models with int32/int64 inputs): with
calibration data it is full-integer (INT8 weights and activations, float I/O; integer inputs stay
integer and are fed as they are; ops without an INT8 kernel and the ``float_ops`` of the request
stay float), without it dynamic-range (INT8 weights only).

onnx2tf gets a graph whose every shape is static: the intake fixes the inputs, and the stale
``value_info`` an exporter left behind (``['unk__44', 214]``) is re-inferred from them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import ConversionError
from ...manifest import TensorSpec
from ...types import Precision, Target
from .. import toolchains
from .base import ExportRequest, ExportResult, ExportTarget, Recipe, When

TIMEOUT_S = 1800.0
# onnx2tf fetches this for any 3-channel image input unless it sits in its working dir. Our INT8
# calibration never uses it (TensorFlow's converter gets the real samples), so any content will do.
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
# What onnx2tf's -rtpo can rewrite into builtin TFLite ops (its --help), and those of them TFLite
# has no builtin kernel for at all: rewritten from the start, not after a first run shows them.
PSEUDO_OPS = ("Asin", "Acos", "Atan", "Abs", "PReLU", "LeakyReLU", "Power", "GatherND", "Neg", "HardSwish", "Erf", "GeLU")
NO_TFLITE_KERNEL = ("Erf", "Asin", "Acos", "Atan")
LOG_FILE = "onnx2tf.log"  # the last onnx2tf run's output, beside what it wrote

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

# TensorFlow's converter on onnx2tf's SavedModel: INT8 with each input's own dtype.
_QUANTIZE = r"""
import json, re, sys
import numpy as np
import onnx
import tensorflow as tf
config = json.load(open(sys.argv[1]))
data = np.load(config["data"])
norm = lambda name: re.sub(r"[^0-9a-z]", "_", name.lower())
signature = tf.saved_model.load(config["saved_model"]).signatures["serving_default"]
# Each input has two names: the signature's keyword (a Python identifier: "input_1") and its
# tensor's name ("input.1"), which is what the converted model's signature runner, and so the
# calibrator, looks samples up by. A sample carries both.
specs = signature.structured_input_signature[1]
names = {key: {key, spec.name} for key, spec in specs.items()}
ours = {norm(name): name for name in data.files}
by_key = {key: next((ours[norm(n)] for n in sorted(aliases) if norm(n) in ours), None) for key, aliases in names.items()}
if None in by_key.values():  # onnx2tf renamed them: its inputs keep the model's order
    by_key = dict(zip(specs, data.files))
converter = tf.lite.TFLiteConverter.from_saved_model(config["saved_model"])
converter.optimizations = [tf.lite.Optimize.DEFAULT]
converter._experimental_disable_per_channel = not config["per_channel"]
def representative():
    for i in range(len(data[data.files[0]])):
        yield {alias: data[name][i] for key, name in by_key.items() for alias in names[key]}
if config["full_integer"]:
    converter.representative_dataset = representative
    # INT8 kernels where TFLite has them, float kernels for the rest.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
if config["full_integer"] and config["float_ops"]:
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=config["float_ops"])
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative,
                                                         debug_options=options)
    model = debugger.get_nondebug_quantized_model()
else:
    model = converter.convert()
open(config["out"], "wb").write(model)
print("EDGE_SDK_QUANTIZED", len(model))
"""


def channel_last(rank: int) -> list[int] | None:
    """The permutation onnx2tf applies to an input of ``rank`` (None: unchanged)."""
    return [0, *range(2, rank), 1] if rank >= 3 else None


@dataclass(frozen=True)
class TFLiteInt8:
    """How one INT8 recipe quantizes: full-integer from the calibration data, or dynamic-range (weights only)."""

    dynamic_range: bool = False


INT8_RECIPES = (
    # Without calibration data the plain recipe is dynamic-range itself.
    Recipe("int8", Precision.INT8, "TFLite INT8, full-integer with calibration data (else dynamic-range)",
           options=TFLiteInt8()),
    Recipe("int8-dynamic-range", Precision.INT8, "TFLite dynamic-range INT8: INT8 weights, float activations",
           when=When.FALLBACK, needs_calibration=True, options=TFLiteInt8(dynamic_range=True)),
)


class TFLiteTarget(ExportTarget):
    target = Target.TFLITE
    backend = "tflite"

    def precisions(self) -> frozenset[Precision]:
        return frozenset({Precision.FP32, Precision.FP16, Precision.INT8})

    def recipes(self, precision: Precision) -> tuple[Recipe, ...]:
        return INT8_RECIPES if precision is Precision.INT8 else tuple(super().recipes(precision))

    def check_available(self) -> None:
        toolchains.require("tflite")

    def export(self, request: ExportRequest) -> ExportResult:
        if request.precision not in self.precisions():
            raise ConversionError(f"tflite: precision {request.precision} is not supported (use fp32, fp16 or int8)")
        for spec in request.inputs:
            if not all(isinstance(d, int) and d > 0 for d in spec.shape):
                raise ConversionError(f"tflite: input {spec.name!r} has a dynamic shape {spec.shape}; onnx2tf needs static shapes")
        options = request.recipe.options if request.recipe is not None else None
        dynamic_range = isinstance(options, TFLiteInt8) and options.dynamic_range
        full_integer = request.precision is Precision.INT8 and bool(request.calibration) and not dynamic_range
        toolchains.require("tflite")
        request.out_dir.mkdir(parents=True, exist_ok=True)
        out = request.out_dir / f"{request.variant_id}.tflite"
        with tempfile.TemporaryDirectory(prefix="edge-sdk-tflite-") as tmp:
            work = Path(tmp)
            converted, notes, kept = _onnx2tf(request.model_path, request.scratch_dir or work)
            if request.precision is Precision.INT8:
                calibration = ({spec.name: _stacked(request, spec, spec.name in kept) for spec in request.inputs}
                               if full_integer else {})
                produced = _quantize(work, converted, request, calibration)
                why = "the recipe" if dynamic_range else "no calibration data"
                notes.append(f"int8 full-integer, calibrated on {len(request.calibration)} samples (NHWC)" if full_integer
                             else f"int8 dynamic-range ({why}): INT8 weights, float activations")
                if request.float_ops:
                    notes.append(f"kept float: {', '.join(request.float_ops)}")
            else:
                produced = converted / f"model_{_suffix(request)}.tflite"
                if not produced.is_file() or produced.stat().st_size == 0:
                    log = (converted.parent / LOG_FILE).read_text(encoding="utf-8")
                    raise ConversionError(f"tflite: onnx2tf exited 0 but wrote no {produced.name}", log=log)
            signature = _inspect(work, produced)
            inputs = _match(request.inputs, signature["inputs"], "input", kept)
            outputs = _match(request.outputs, signature["outputs"], "output")
            shutil.copyfile(produced, out)  # onnx2tf's own files stay for the conversion's other exports
        return ExportResult(files=[out], inputs=inputs, outputs=outputs, notes=notes,
                            nodes_quantized=None if request.precision is not Precision.INT8 else _count_quantized(out))


def _onnx2tf(model: Path, root: Path) -> tuple[Path, list[str], list[str]]:
    """onnx2tf's output folder for ``model`` (its float32 and float16 ``.tflite`` files and the
    SavedModel INT8 starts from, ``-osd``), what was done to make it, and the inputs kept in their
    ONNX layout.

    Made once per model under ``root``, which every precision and recipe of a conversion shares
    (onnx2tf takes minutes on a transformer); a failure is kept too, so the other exports report
    it at once instead of repeating it. Ops TFLite has no builtin kernel for come out as TF Select
    ("Flex") ops, which LiteRT cannot run: those onnx2tf can rewrite into builtin ops (a
    transformer's GELU ``Erf``) are, in a second run. When the channel-last conversion fails and
    some input has rank >= 3, it is tried once more with those inputs kept as they are (``-kat``):
    a recurrent state ``[layers, batch, hidden]`` has no channels to move, and onnx2tf's moving
    them breaks the LSTM that reads it (silero-vad)."""
    with model.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    folder = root / f"onnx2tf-{digest}"
    done, failed = folder / "done.json", folder / "failed.json"
    if failed.is_file():
        saved = json.loads(failed.read_text(encoding="utf-8"))
        raise ConversionError(saved["message"], log=saved["log"])
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        return folder / "tf", saved["notes"], saved["kept"]
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier run
    folder.mkdir(parents=True)
    graph_ops, ranks = static_copy(model, folder / "model.onnx")
    np.save(folder / SAMPLE_FILE, np.zeros((20, 128, 128, 3), np.float32))
    pseudo = sorted(graph_ops & set(NO_TFLITE_KERNEL))
    notes = [f"onnx2tf: {', '.join(pseudo)} rewritten into builtin TFLite ops (-rtpo): TFLite has no kernel for "
             "them"] if pseudo else []
    kept: list[str] = []
    movable = sorted(name for name, rank in ranks.items() if rank >= 3)
    first_failure, log = "", ""
    while True:
        shutil.rmtree(folder / "tf", ignore_errors=True)
        args = (["-i", "model.onnx", "-o", "tf", "-osd"] + (["-rtpo", *pseudo] if pseudo else [])
                + (["-kat", *kept] if kept else []))
        run = toolchains.run("tflite", args, cwd=folder, timeout=TIMEOUT_S)
        log += run.output
        (folder / LOG_FILE).write_text(log, encoding="utf-8")
        if run.returncode != 0 and movable and not kept:
            kept, first_failure = movable, run.failure("onnx2tf", _unsupported(run.output))
            continue
        if run.returncode != 0:
            # The default conversion's failure is the one to report; the log has both runs.
            error = ConversionError(f"tflite: {first_failure or run.failure('onnx2tf', _unsupported(run.output))}",
                                    log=log)
            failed.write_text(json.dumps({"message": str(error), "log": log}), encoding="utf-8")
            raise error
        if first_failure:
            notes.append(f"onnx2tf: inputs {', '.join(kept)} kept in their ONNX layout (-kat), as channel-last "
                         f"{first_failure}")
            first_failure = ""
        flex = _flex_ops(folder / "tf" / "model_float32.tflite")
        rewritable = sorted(set(flex) & set(PSEUDO_OPS) - set(pseudo))
        if not rewritable:
            break
        pseudo += rewritable
        notes.append(f"onnx2tf: {', '.join(rewritable)} rewritten into builtin TFLite ops (-rtpo): as TF Select "
                     "ops LiteRT could not run them")
    done.write_text(json.dumps({"notes": notes, "kept": kept}), encoding="utf-8")
    return folder / "tf", notes, kept


def _flex_ops(tflite: Path) -> list[str]:
    """The TF Select ops a ``.tflite`` file uses (custom op codes ``Flex<Op>`` in the flatbuffer)."""
    if not tflite.is_file():
        return []
    return sorted({m.decode() for m in re.findall(rb"Flex([A-Z][A-Za-z0-9]*)", tflite.read_bytes())})


def static_copy(source: Path, dest: Path) -> tuple[set[str], dict[str, int]]:
    """Write ``source`` to ``dest`` with every intermediate and output shape re-inferred from its
    inputs; return the graph's op types and each input's rank.

    Exporters leave ``value_info`` computed for a dynamic batch (``unk__44``); once the inputs are
    fixed, inferring again from them makes every shape static for onnx2tf.
    """
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and OSError alike
        raise ConversionError(f"tflite: cannot read {source.name} as ONNX ({type(exc).__name__})") from None
    _scope_safe_node_names(model.graph)
    static = [v for v in model.graph.value_info if all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    del model.graph.value_info[:]
    model.graph.value_info.extend(static)  # the intake's resolved shapes; stale symbolic ones are re-inferred
    for output in model.graph.output:
        if any(not d.HasField("dim_value") for d in output.type.tensor_type.shape.dim):
            output.type.tensor_type.ClearField("shape")
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx raises several types; onnx2tf can still infer shapes itself
        pass
    _slices_on_their_own_axes(model.graph)
    onnx.save(model, str(dest))
    initializers = {t.name for t in model.graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.input if v.name not in initializers}
    return {node.op_type for node in model.graph.node}, ranks


def _slices_on_their_own_axes(graph: onnx.GraphProto) -> None:
    """Rewrite each constant ``Slice`` to name only the axes it cuts, and drop those that cut nothing.

    onnx2tf does not carry a Slice that lists several axes over its channel-last transposition: it
    cuts the wrong one (silero-vad's STFT, once onnx2tf's onnxsim has fused ``[0:MAX]`` copies on
    other axes into the real cut, comes out empty; magika's jax2tf ``strided_slice`` copies over all
    four axes cost it 94 points of top-1). A cut on its own axis converts right.
    """
    constants = {t.name: t for t in graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info] if v.type.tensor_type.HasField("shape")}
    outputs = {o.name for o in graph.output}
    bypass: dict[str, str] = {}
    for node in list(graph.node):
        node.input[:] = [bypass.get(name, name) for name in node.input]
        parts = list(node.input[1:]) + [""] * (5 - len(node.input))
        if node.op_type != "Slice" or any(p and p not in constants for p in parts):
            continue
        starts, ends = (numpy_helper.to_array(constants[p]).astype(np.int64) for p in parts[:2])
        axes = numpy_helper.to_array(constants[parts[2]]) if parts[2] else np.arange(len(starts))
        steps = numpy_helper.to_array(constants[parts[3]]) if parts[3] else np.ones(len(starts), np.int64)
        dims = shapes.get(node.input[0])
        if np.any(steps != 1) or (dims is None and np.any(axes < 0)):
            continue
        cut = []
        for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist()):
            size = dims[axis] if dims is not None and dims[axis] is not None else None
            if start == 0 and (end >= np.iinfo(np.int32).max or (size is not None and end >= size)):
                continue  # the whole axis
            cut.append((start, min(end, size) if size is not None else end, axis))
        if not cut and node.output[0] not in outputs:
            bypass[node.output[0]] = node.input[0]
            graph.node.remove(node)
        elif cut and len(cut) < len(starts):
            names = [f"{node.name}/{what}" for what in ("starts", "ends", "axes")]
            for name, column in zip(names, zip(*cut)):
                graph.initializer.append(numpy_helper.from_array(np.asarray(column, np.int64), name))
            node.input[1:] = names
    for node in graph.node:  # nested bodies read the bypassed names too
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                for inner in body.node:
                    inner.input[:] = [bypass.get(name, name) for name in inner.input]


_SCOPE_UNSAFE = re.compile(r"[^A-Za-z0-9_.\\/>-]")  # what a TensorFlow name scope may not contain


def _scope_safe_node_names(graph: onnx.GraphProto) -> None:
    """onnx2tf names each TF op after its ONNX node, and TensorFlow refuses a scope name outside
    ``[A-Za-z0-9_.\\/>-]`` (PP-OCR's ``Softmax@0``): such node names get ``_`` instead, kept unique.
    Tensor names, which the signature is matched by, are left alone."""
    taken = {node.name for node in graph.node}
    for node in graph.node:
        if not _SCOPE_UNSAFE.search(node.name):
            continue
        base = _SCOPE_UNSAFE.sub("_", node.name)
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        node.name = name


def _quantize(work: Path, saved_model: Path, request: ExportRequest, calibration: dict[str, np.ndarray]) -> Path:
    data, out = work / "calibration.npz", work / "model_int8.tflite"
    np.savez(data, **calibration)  # empty for dynamic-range: no activation ranges needed
    config = {"saved_model": str(saved_model), "data": data.name, "out": out.name, "full_integer": bool(calibration),
              "per_channel": request.per_channel, "float_ops": list(request.float_ops)}
    (work / "quantize.json").write_text(json.dumps(config), encoding="utf-8")
    (work / "quantize_tflite.py").write_text(_QUANTIZE, encoding="utf-8")
    run = toolchains.run("tflite", ["quantize_tflite.py", "quantize.json"], cwd=work, timeout=TIMEOUT_S, program="bin/python")
    if run.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        select = re.search(r"TF Select ops: ([^\n]+)", run.output)
        cause = f"no builtin TFLite kernel for {select.group(1).strip()[:120]} (TF Select ops)" if select else ""
        raise ConversionError("tflite int8: " + run.failure("TensorFlow's converter", cause), log=run.output)
    return out


def _suffix(request: ExportRequest) -> str:
    return "float16" if request.precision is Precision.FP16 else "float32"


def _stacked(request: ExportRequest, spec: TensorSpec, kept: bool) -> np.ndarray:
    """All calibration samples of one input along a new first axis, each in the artifact's layout
    (channel-last unless onnx2tf ``kept`` the input's own)."""
    arrays = []
    for k, feeds in enumerate(request.calibration):
        if spec.name not in feeds:
            raise ConversionError(f"tflite: calibration sample {k} has no input {spec.name!r} (has {sorted(feeds)})")
        array = np.asarray(feeds[spec.name])
        if array.dtype != np.dtype(spec.dtype):
            # Integer inputs (token ids, masks, sample rates) are calibrated with what they really receive.
            raise ConversionError(f"tflite: calibration sample {k} gives input {spec.name!r} as {array.dtype}; "
                                  f"the model takes {spec.dtype}")
        if list(array.shape) != list(spec.shape):
            raise ConversionError(f"tflite: calibration sample {k} input {spec.name!r} has shape {list(array.shape)}, "
                                  f"expected {spec.shape} (the model's layout, e.g. NCHW)")
        arrays.append(array)
    perm = None if kept else channel_last(len(spec.shape))
    return np.stack([np.ascontiguousarray(a.transpose(perm)) if perm else a for a in arrays])


def _inspect(work: Path, tflite: Path) -> dict:
    script = work / "inspect_signature.py"
    script.write_text(_INSPECT, encoding="utf-8")
    run = toolchains.run("tflite", [script.name, str(tflite)], cwd=work, timeout=300, program="bin/python")
    line = next((ln for ln in run.output.splitlines() if ln.startswith("EDGE_SDK_SIGNATURE ")), None)
    if run.returncode != 0 or line is None:
        raise ConversionError(f"tflite: cannot read the signature of {tflite.name}: {run.failure('LiteRT')}", log=run.output)
    return json.loads(line.split(" ", 1)[1])


def _norm(name: str) -> str:
    name = re.sub(r"^serving_default_", "", name)
    name = re.sub(r":\d+$", "", name)
    return re.sub(r"[^0-9A-Za-z]", "_", name).lower()


def _order(detail: dict) -> tuple[str, int]:
    """onnx2tf's outputs are ``PartitionedCall:<k>`` / ``Identity_<k>`` with k the model's output index."""
    m = re.search(r"[:_](\d+)$", detail["name"])
    return (re.sub(r"[:_]\d+$", "", detail["name"]), int(m.group(1)) if m else 0)


def _match(specs, details: list[dict], kind: str, kept: Sequence[str] = ()) -> list[TensorSpec]:
    """Pair the model's tensors with the artifact's: by name where onnx2tf kept it, else in index order.

    Inputs of rank >= 3 must come out channel-last (onnx2tf's rule), unless ``kept`` in their own
    layout; outputs may come out either way, or with their size-1 axes elsewhere (a reshape), and
    get the permutation that gives the caller the ONNX layout.
    """
    if len(specs) != len(details):
        raise ConversionError(f"tflite: the artifact has {len(details)} {kind}s, the model {len(specs)}")
    remaining = sorted(details, key=_order)
    result = []
    for spec in specs:
        shape = list(spec.shape)
        perm = None if spec.name in kept else channel_last(len(shape))
        last = [shape[p] for p in perm] if perm else shape

        def fits(d: dict, shape=shape, last=last) -> bool:
            if kind == "input":
                return _same(d["shape"], last)
            return _same(d["shape"], shape) or _same(d["shape"], last) or _ones_moved(d["shape"], shape) is not None

        named = [d for d in remaining if _norm(d["name"]) == _norm(spec.name) and fits(d)]
        ordered = [d for d in remaining if fits(d)]
        detail = (named or ordered or [None])[0]
        if detail is None:
            raise ConversionError(f"tflite: no artifact {kind} matches {spec.name!r} {shape} or its channel-last "
                                  f"form (artifact {kind}s: {[(d['name'], d['shape']) for d in remaining]})")
        remaining.remove(detail)
        # onnx2tf makes every rank >= 3 tensor channel-last, even when its shape reads the same both ways.
        moved = _ones_moved(detail["shape"], shape) if kind == "output" else None
        if kind == "output" and not _same(detail["shape"], shape) and not _same(detail["shape"], last) and moved:
            transpose, layout = moved, spec.layout
        elif perm is None or (kind == "output" and not _same(detail["shape"], last)):
            transpose, layout = None, spec.layout
        elif kind == "input":
            transpose, layout = perm, _layout_name(len(shape))
        else:  # a channel-last output: the runtime turns it back with the inverse permutation
            transpose, layout = [int(i) for i in np.argsort(perm)], _layout_name(len(shape))
        result.append(spec.model_copy(update={"artifact_name": detail["name"], "transpose": transpose, "layout": layout}))
    return result


def _ones_moved(actual: list[int], expected: list) -> list[int] | None:
    """The permutation of ``actual``'s axes giving ``expected`` when the two differ only in where
    their size-1 axes are (the same data, reshaped: onnx2tf writes a state [2, 1, 128] as
    [1, 2, 128]); None otherwise."""
    if len(actual) != len(expected) or list(actual) == list(expected) or not all(isinstance(e, int) for e in expected):
        return None
    big = [i for i, a in enumerate(actual) if a != 1]
    ones = [i for i, a in enumerate(actual) if a == 1]
    if [actual[i] for i in big] != [e for e in expected if e != 1]:
        return None
    big_iter, ones_iter = iter(big), iter(ones)
    return [next(ones_iter) if e == 1 else next(big_iter) for e in expected]


def _same(actual: list[int], expected: list) -> bool:
    """Shapes agree; a dim the model left symbolic (``unk__44``) agrees with any size."""
    return len(actual) == len(expected) and all(not isinstance(e, int) or a == e for a, e in zip(actual, expected))


def _layout_name(rank: int) -> str:
    return {3: "NWC", 4: "NHWC", 5: "NDHWC"}.get(rank, "channel-last")


def _unsupported(output: str) -> str:
    ops = sorted(set(re.findall(r"(?:not supported|unsupported|NotImplemented)\w*[^\n]*?\b([A-Z][A-Za-z0-9]+)\b", output)))
    return f"ops not expressible in TFLite: {', '.join(ops[:10])}" if ops else ""


def _count_quantized(path: Path) -> int | None:
    """Number of INT8 tensors in the flatbuffer (None when it cannot be read here)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    details = Interpreter(model_path=str(path)).get_tensor_details()
    return sum(1 for d in details if np.dtype(d["dtype"]) == np.int8)
