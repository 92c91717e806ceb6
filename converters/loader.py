"""Load and check an ONNX model before anything else touches it.

Refuses what would break or endanger the later steps with a :class:`ModelError` naming the
problem: not a file, not ONNX, truncated protobuf, ``external_data`` escaping the model's folder
(CVE-2022-25882 class: the file could read arbitrary host files), an opset we cannot run, dynamic
input dimensions that neither ``input_shapes`` nor the samples fix. Opsets below 13 are upgraded
with ``onnx.version_converter`` (per-channel QDQ needs ``DequantizeLinear``'s ``axis``, opset 13);
when that fails the model keeps its opset and the per-channel recipes are skipped.

``--constant-input`` values are folded in, and every ``If`` that they or the now-static shapes
decide is replaced by the branch taken (``converters/specialize.py``): exporters guard squeezes and
RNN batches with such Ifs, and the converters downstream stumble on the branch never taken.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from ..config import named_values
from ..errors import ConfigError, ModelError
from ..manifest import TensorSpec
from .specialize import fold_constant_inputs, inline_static_ifs
from .targets.base import ModelFacts

MIN_OPSET = 13  # per-channel DequantizeLinear
OLDEST_UPGRADABLE = 7  # onnx.version_converter has no adapters below this


@dataclass
class LoadedModel:
    """A checked FP32 model with static shapes, saved as one self-contained file."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_sha256: str
    opset: int
    source_opset: int
    notes: list[str] = field(default_factory=list)
    constants: list[TensorSpec] = field(default_factory=list)  # inputs fixed by --constant-input, no longer fed

    def load(self) -> onnx.ModelProto:
        return onnx.load(str(self.path))

    @functools.cached_property
    def facts(self) -> ModelFacts:
        return model_facts(self.load())


def model_facts(model: onnx.ModelProto) -> ModelFacts:
    """Op counts and weight parameters per op type, subgraph bodies included (recipes decide on them)."""
    ops: Counter[str] = Counter()
    weights: Counter[str] = Counter()
    sizes = {t.name: int(np.prod(t.dims)) for t in all_initializers(model.graph)}
    inside = 0

    def walk(graph: onnx.GraphProto, depth: int) -> None:
        nonlocal inside
        for node in graph.node:
            ops[node.op_type] += 1
            inside += depth > 0
            if node.op_type == "Constant":  # exporters that write weights as Constant nodes
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                sizes[node.output[0]] = int(np.prod(value.dims)) if value is not None else 0
            weights[node.op_type] += sum(sizes.get(name, 0) for name in node.input)
            for attribute in node.attribute:
                for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                    walk(body, depth + 1)

    walk(model.graph, 0)
    floats = sum(1 for v in _graph_inputs(model) if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    return ModelFacts(op_counts=dict(ops), weight_params=dict(weights), subgraph_nodes=inside, float_inputs=floats,
                      opset=_default_opset(model))


def all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                found.extend(all_initializers(body))
    return found


def parse_input_shapes(specs: Sequence[str] | Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """``["image=1,3,224,224"]`` (CLI form) or ``{"image": (1, 3, 224, 224)}`` → dict; ConfigError if malformed."""
    items = named_values(specs, "--input-shape", "NAME=D1,D2,... (e.g. image=1,3,224,224)")
    shapes = {}
    for name, dims in ((n, d.split(",") if isinstance(d, str) else d) for n, d in items):
        try:
            shape = tuple(int(d) for d in dims)
        except (TypeError, ValueError):
            raise ConfigError(f"--input-shape {name}: dimensions must be integers, got {list(dims)}") from None
        if not shape or any(d < 1 for d in shape):
            raise ConfigError(f"--input-shape {name}: dimensions must be positive integers, got {list(shape)}")
        shapes[name] = shape
    return shapes


def load_model(path: Path | str, work_dir: Path, input_shapes: Mapping[str, Sequence[int]] | None = None) -> LoadedModel:
    """Check ``path`` and write a static-shape, opset >= 13, self-contained copy into ``work_dir``."""
    return read_model(path, input_shapes).finish(work_dir)


@dataclass
class SourceModel:
    """A parsed, checked model whose inputs may still have symbolic dims (the samples may fix them).

    :func:`read_model` fixes what ``--input-shape`` says and a dynamic leading batch dim (to 1);
    :meth:`finish` fixes the rest from the shapes the samples have, resolves every output and
    intermediate shape, and saves the model (:class:`LoadedModel`).
    """

    path: Path
    model: onnx.ModelProto
    source_sha256: str
    source_opset: int
    notes: list[str]
    source_dims: dict[str, list[int | str]]  # each input's dims as the file declares them
    constants: list[TensorSpec] = field(default_factory=list)  # inputs fixed by --constant-input
    changed: bool = False  # an input shape was fixed: stale intermediate shapes must be re-inferred
    # The input dims as asked for, when onnxruntime refused some of them fixed (they stay dynamic
    # in the graph; random probe inputs still take these sizes).
    run_dims: dict[str, list[int | str]] = field(default_factory=dict)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in _graph_inputs(self.model)]

    def finish(self, work_dir: Path, observed: Mapping[str, Sequence[Sequence[int]]] | None = None,
               samples: Sequence[dict[str, np.ndarray]] = ()) -> LoadedModel:
        """Fix the remaining symbolic input dims from ``observed`` sample shapes, resolve the rest, save."""
        for value in _graph_inputs(self.model):
            if _fix_from_samples(self.path, value, (observed or {}).get(value.name, ()), self.notes):
                self.changed = True
        try:
            return self._save(work_dir, samples)
        except ModelError:
            if not (self.changed and self._keep_refused_dims_dynamic()):
                raise
            return self._save(work_dir, samples)

    def _save(self, work_dir: Path, samples: Sequence[dict[str, np.ndarray]]) -> LoadedModel:
        model = self.model
        if self.changed:
            # Stale intermediate/output shapes would contradict the new input shapes: re-infer them.
            del model.graph.value_info[:]
            for output in model.graph.output:
                for dim in output.type.tensor_type.shape.dim:
                    dim.Clear()  # unknown again; shape inference fills it from the new input shapes
        try:
            onnx.checker.check_model(model)
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ModelError(f"{self.path}: invalid ONNX model: {_first_line(exc)}") from None
        out = work_dir / "model.fp32.onnx"
        onnx.save(model, str(out))
        _check_runs(self.path, out)
        from .calibration import random_samples

        probe = [spec.model_copy(update={"shape": self.run_dims.get(spec.name, spec.shape)})
                 for spec in map(_spec, _graph_inputs(model))]
        samples = samples or random_samples(probe, 2, seed=0).samples
        inlined = 0
        while True:  # an If decided by the shapes now static can hide more of them in its branch
            notes: list[str] = []  # the last run's only: each one resolves what is still symbolic
            if _symbolic(model):
                model = _shapes_from_a_run(model, samples, notes)
            try:
                model, done = inline_static_ifs(model)
            except onnx.shape_inference.InferenceError as exc:
                raise ModelError(f"{self.path}: invalid ONNX model once its Ifs are inlined: {_first_line(exc)}") from None
            if not done:
                break
            inlined += done
        self.notes.extend(notes)
        onnx.save(model, str(out))
        if inlined:
            self.notes.append(f"{inlined} If node(s) decided by the static shapes replaced by the branch taken")
            _check_runs(self.path, out)
        return LoadedModel(path=out, inputs=[_spec(v) for v in _graph_inputs(model)],
                           outputs=[_spec(v) for v in model.graph.output], source_sha256=self.source_sha256,
                           opset=_default_opset(model), source_opset=self.source_opset, notes=self.notes,
                           constants=self.constants)

    def _keep_refused_dims_dynamic(self) -> bool:
        """Undo the input-dim fixes onnxruntime refuses, one dim at a time; True when that helps.

        Shape inference also type-checks the ``If`` branch a model never takes at the fixed size
        (silero-vad: the 8 kHz branch at the 16 kHz chunk length), so a model that runs at that
        size can still be refused once the size is written into the graph. Such dims stay dynamic.
        """
        inputs = _graph_inputs(self.model)
        fixed = {v.name: _dims(v) for v in inputs}
        self.run_dims = fixed
        for value in inputs:
            _set_dims(value, self.source_dims[value.name])
        if _refusal(self.model) is not None:
            return False  # the source itself is refused: the first error is the one to report
        for value in inputs:
            kept, why = [], ""
            for axis, (source, size) in enumerate(zip(self.source_dims[value.name], fixed[value.name], strict=True)):
                if source == size:
                    continue
                _set_dim(value, axis, size)
                refusal = _refusal(self.model)
                if refusal is not None:
                    _set_dim(value, axis, source)
                    kept.append(f"{axis} (size {size})")
                    why = why or refusal
            if kept:
                self.notes.append(f"input {value.name}: axes {', '.join(kept)} kept dynamic: onnxruntime refuses "
                                  f"the model with them fixed ({why})")
        return True


def read_model(path: Path | str, input_shapes: Mapping[str, Sequence[int]] | None = None,
               constant_inputs: Mapping[str, np.ndarray] | None = None) -> SourceModel:
    """Parse and check ``path``; fold ``constant_inputs`` into it (``converters/specialize.py``),
    apply ``input_shapes`` and fix a dynamic leading (batch) dim to 1."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    data = path.read_bytes()
    model = _parse(path, data)
    notes: list[str] = []
    _load_external_data(path, model)
    source_opset = _default_opset(model)
    model = _upgrade(path, model, source_opset, notes)
    _initializers_out_of_inputs(model, notes)
    _subgraph_constants_to_initializers(model, notes)
    folded = fold_constant_inputs(model, constant_inputs or {}, path, notes)
    _name_nodes(model, notes)
    source = SourceModel(path, model, hashlib.sha256(data).hexdigest(), source_opset, notes,
                         {v.name: _dims(v) for v in _graph_inputs(model)},
                         [_spec(value).model_copy(update={"constant": fixed.tolist()}) for value, fixed in folded.values()])
    source.changed = _fix_input_shapes(path, model, dict(input_shapes or {}), notes)
    return source


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX file (truncated or corrupt protobuf: {_first_line(exc)})") from None
    # Random bytes sometimes decode as an (empty) protobuf message: insist on a real graph.
    if model.ir_version < 3 or not model.graph.node or not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no IR version, graph nodes or outputs)")
    return model


def _load_external_data(path: Path, model: onnx.ModelProto) -> None:
    folder = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (folder / location).resolve()
        if location.is_absolute() or not target.is_relative_to(folder):
            raise ModelError(f"{path}: tensor {tensor.name!r} has external_data location {info.location!r} "
                             f"outside the model's folder; refusing to read it (path traversal)")
        if not target.is_file():
            raise ModelError(f"{path}: tensor {tensor.name!r}: external data file {info.location!r} is missing")
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as exc:
        raise ModelError(f"{path}: cannot read external data: {_first_line(exc)}") from None


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise ModelError("model imports no default-domain opset")


def _upgrade(path: Path, model: onnx.ModelProto, opset: int, notes: list[str]) -> onnx.ModelProto:
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelError(f"{path}: unsupported opset {opset} (this onnx supports up to {newest})")
    if opset >= MIN_OPSET:
        return model
    if opset < OLDEST_UPGRADABLE:
        raise ModelError(f"{path}: unsupported opset {opset} (oldest supported: {OLDEST_UPGRADABLE}; "
                         f"re-export the model with opset >= {MIN_OPSET})")
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # noqa: BLE001 - the model as given still converts; per-channel recipes are skipped
        notes.append(f"opset {opset} kept: upgrading to {MIN_OPSET} failed in onnx's version converter "
                     f"({type(exc).__name__}); per-channel INT8 recipes need >= {MIN_OPSET}")
        return model
    notes.append(f"upgraded opset {opset} -> {MIN_OPSET} (per-channel INT8 needs >= {MIN_OPSET})")
    return upgraded


def _initializers_out_of_inputs(model: onnx.ModelProto, notes: list[str]) -> None:
    """Old exporters list weights as graph inputs too; then they are overridable, not constants, and
    onnxruntime neither folds nor fuses them and quantizers may skip them. Nobody feeds them: drop them."""
    initializers = {i.name for i in model.graph.initializer}
    used = _used_names(model.graph) | {o.name for o in model.graph.output}
    unused = [i for i in model.graph.initializer if i.name not in used]
    if unused:
        for tensor in unused:
            model.graph.initializer.remove(tensor)
        notes.append(f"dropped {len(unused)} unused initializers")
    kept = [v for v in model.graph.input if v.name not in initializers]
    removed = len(model.graph.input) - len(kept)
    if removed:
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)  # IR < 4 required initializers to be inputs
        notes.append(f"removed {removed} initializers from the graph inputs (they are constants)")


def _subgraph_constants_to_initializers(model: onnx.ModelProto, notes: list[str]) -> None:
    """Exporters write the weights inside ``If``/``Loop`` bodies as ``Constant`` nodes (silero-vad:
    every Conv and LSTM weight); onnxruntime's quantizer only quantizes initializers ("Expected
    ... to be an initializer"). Each such tensor becomes an initializer of its own body."""
    lifted = 0

    def lift(graph: onnx.GraphProto, inside: bool) -> None:
        nonlocal lifted
        outputs = {o.name for o in graph.output}
        kept = []
        for node in graph.node:
            for attribute in node.attribute:
                for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    lift(body, True)
            if (inside and node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]
                    and node.output[0] not in outputs):
                tensor = graph.initializer.add()
                tensor.CopyFrom(node.attribute[0].t)
                tensor.name = node.output[0]
                lifted += 1
            else:
                kept.append(node)
        if len(kept) != len(graph.node):
            del graph.node[:]
            graph.node.extend(kept)

    lift(model.graph, False)
    if lifted:
        notes.append(f"{lifted} Constant nodes inside subgraphs made initializers (quantizers read weights from those)")


def _name_nodes(model: onnx.ModelProto, notes: list[str]) -> None:
    """Give unnamed main-graph nodes unique names: quantizers and reports refer to nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    if count:
        notes.append(f"named {count} unnamed nodes (<op>_<index>)")


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, including nodes inside If/Loop/Scan bodies (outer-scope reads)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                used |= _used_names(sub)
    return used


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _fix_input_shapes(path: Path, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], notes: list[str]) -> bool:
    """Apply ``--input-shape`` and fix a symbolic leading dim to 1 (batch); True when a shape changed."""
    inputs = _graph_inputs(model)
    names = [v.name for v in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ConfigError(f"--input-shape names {unknown} are not inputs of {path.name} (inputs: {names})")
    changed = False
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        current = _dims(value)
        if value.name in shapes:
            wanted = shapes[value.name]
            if len(wanted) != len(dims):
                raise ConfigError(f"--input-shape {value.name}: rank {len(wanted)} {list(wanted)} != the model's rank {len(dims)} {current}")
            for dim, size in zip(dims, wanted):
                dim.Clear()
                dim.dim_value = size
            if list(wanted) != current:
                changed = True
                notes.append(f"input {value.name}: shape {current} fixed to {list(wanted)}")
        elif dims and not isinstance(current[0], int) and len(dims) > 1:
            dims[0].Clear()
            dims[0].dim_value = 1
            changed = True
            notes.append(f"input {value.name}: dynamic batch dim {current[0]!r} fixed to 1 (pass --input-shape to choose)")
    return changed


def _fix_from_samples(path: Path, value: onnx.ValueInfoProto, seen: Sequence[Sequence[int]], notes: list[str]) -> bool:
    """Fix ``value``'s symbolic dims to the size every sample has there; a clear error otherwise."""
    current = _dims(value)
    symbolic = [axis for axis, d in enumerate(current) if not isinstance(d, int)]
    if not symbolic:
        return False
    sizes = {axis: sorted({int(shape[axis]) for shape in seen if len(shape) == len(current)}) for axis in symbolic}
    unclear = {axis: found for axis, found in sizes.items() if len(found) != 1}
    if unclear:
        hint = [str(d) if isinstance(d, int) else str(max(sizes[axis])) if sizes[axis] else "N"
                for axis, d in enumerate(current)]
        seen_text = "; ".join(f"{current[axis]!r} is {found} in the samples" for axis, found in unclear.items() if found)
        raise ModelError(f"{path}: input {value.name!r} has dynamic dimensions {current}"
                         f"{' (' + seen_text + ')' if seen_text else ''}; pass --input-shape {value.name}={','.join(hint)}"
                         + (" and samples of that shape" if seen_text else ""))
    dims = value.type.tensor_type.shape.dim
    for axis in symbolic:
        dims[axis].Clear()
        dims[axis].dim_value = sizes[axis][0]
    notes.append(f"input {value.name}: dynamic dims {[current[a] for a in symbolic]} fixed to "
                 f"{[sizes[a][0] for a in symbolic]}, the size every sample has")
    return True


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def _set_dims(value: onnx.ValueInfoProto, dims: Sequence[int | str]) -> None:
    for axis, dim in enumerate(dims):
        _set_dim(value, axis, dim)


def _set_dim(value: onnx.ValueInfoProto, axis: int, dim: int | str) -> None:
    proto = value.type.tensor_type.shape.dim[axis]
    proto.Clear()
    if isinstance(dim, int):
        proto.dim_value = dim
    elif dim != "?":
        proto.dim_param = dim


def _refusal(model: onnx.ModelProto | Path) -> str | None:
    """Why onnxruntime will not load ``model`` (a file: any size), in one line; None when it loads."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(model) if isinstance(model, Path) else model.SerializeToString(), so,
                             providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal is the answer
        return _ort_reason(exc)
    return None


def _symbolic(model: onnx.ModelProto) -> bool:
    return any(not isinstance(d, int) for v in [*model.graph.output, *model.graph.value_info] for d in _dims(v))


def _shapes_from_a_run(model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]],
                       notes: list[str]) -> onnx.ModelProto:
    """Output/intermediate dims shape inference left symbolic, taken from FP32 runs where they agree.

    Exporters and name matching break on symbolic output dims (``unk__44``). Dims that differ
    between two inputs are data-dependent (a detector's box count) and stay symbolic, noted.
    """
    import onnxruntime as ort

    feeds = list(samples[:2])
    pending = [v for v in [*model.graph.output, *model.graph.value_info] if any(not isinstance(d, int) for d in _dims(v))]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(v.name) for v in pending if v.name not in known)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every intermediate
        session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [v.name for v in pending]
        runs = [dict(zip(names, session.run(names, f))) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - shapes stay symbolic; later steps say what they cannot do
        notes.append(f"could not resolve symbolic output shapes with an FP32 run ({type(exc).__name__})")
        return model
    varying = []
    for value in pending:
        shapes = {tuple(np.shape(run[value.name])) for run in runs}
        shape = next(iter(shapes))
        dims = value.type.tensor_type.shape.dim
        if len(shapes) != 1 or len(shape) != len(dims):
            varying.append(value.name)
            continue
        for dim, size in zip(dims, shape):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                dim.Clear()
                dim.dim_value = size
    resolved = len(pending) - len(varying)
    if resolved:
        notes.append(f"resolved {resolved} symbolic output/intermediate shapes from an FP32 run")
    outputs = [v.name for v in model.graph.output]
    if varying:
        data_dependent = [n for n in varying if n in outputs] or varying[:5]
        notes.append(f"data-dependent shapes stay symbolic: {data_dependent[:5]}")
    return model


def _check_runs(source: Path, path: Path) -> None:
    refusal = _refusal(path)
    if refusal is not None:
        raise ModelError(f"{source}: onnxruntime cannot load the model: {refusal}")


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    except (KeyError, TypeError):
        raise ModelError(f"tensor {value.name!r}: unsupported element type {tensor.elem_type}") from None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's load error in one line: no status prefix, and of a chain through subgraphs
    ("Graph attribute inferencing failed: Node (..) ... Node (..) <cause>") only the innermost node."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]  # "[ONNXRuntimeError] : 1 : FAIL : <message>"
    return text.rsplit("Graph attribute inferencing failed: ", 1)[-1][:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
