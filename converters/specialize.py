"""Specialize a model on inputs the device always feeds the same value (``--constant-input``).

A model that branches on such an input (silero-vad's ``If`` on the sample rate) carries a branch
the device never runs, and that branch is what breaks static shapes and the converters: shape
inference, onnx2tf, pnnx and OpenVINO's frontend all type-check or convert both branches. Fixing
the input's value makes it an initializer; each ``If`` whose condition then depends on constants
only is replaced by the branch it takes (nested ones too), and what no longer feeds an output is
dropped. Released variants list the input with its value (``TensorSpec.constant``): a caller may
keep passing it, with that value only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..config import named_values
from ..errors import ConfigError, ModelError

ConstantValue = int | float | bool | Sequence[int | float | bool] | np.ndarray


def parse_constant_inputs(specs: Sequence[str] | Mapping[str, ConstantValue] | None) -> dict[str, np.ndarray]:
    """``["sr=16000"]`` (the CLI's form, ``NAME=V1,V2,...`` for a vector) or ``{"sr": 16000}`` → arrays."""
    constants = {}
    for name, value in named_values(specs, "--constant-input", "NAME=VALUE or NAME=V1,V2,... (e.g. sr=16000)"):
        if isinstance(value, str) and not isinstance(specs, Mapping):  # the CLI's text
            try:
                parsed = [float(v) if any(c in v for c in ".eE") else int(v) for v in value.split(",")]
            except ValueError:
                raise ConfigError(f"--constant-input {name}={value}: values must be numbers") from None
            value = parsed[0] if len(parsed) == 1 else parsed
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" or array.size == 0:
            raise ConfigError(f"--constant-input {name}: expected a number or a list of numbers, got {value!r}")
        constants[name] = array
    return constants


def fold_constant_inputs(model: onnx.ModelProto, constants: Mapping[str, np.ndarray], path: Path,
                         notes: list[str]) -> dict[str, tuple[onnx.ValueInfoProto, np.ndarray]]:
    """Make each of ``constants`` an initializer of ``model`` and inline the ``If`` nodes that decides.

    Returns each removed graph input with the value it was fixed at (cast to its type and shape).
    A name that is not an input, or a value that does not fit it, is a :class:`ConfigError`.
    """
    inputs = {v.name: v for v in model.graph.input}
    removed = {}
    for name, value in constants.items():
        if name not in inputs:
            raise ConfigError(f"--constant-input {name}: the model has no input {name!r} (inputs: {sorted(inputs)})")
        fitted = _fit(name, value, inputs[name])
        model.graph.input.remove(inputs[name])
        model.graph.initializer.append(numpy_helper.from_array(fitted, name))
        removed[name] = (inputs[name], fitted)
    if not removed:
        return removed
    inlined = 0
    while (done := _inline_constant_ifs(model)) > 0:
        inlined += done
    dropped = _drop_dead_nodes(model.graph)
    names = ", ".join(f"{n}={fitted.tolist()}" for n, (_, fitted) in removed.items())
    effect = (f"{inlined} If node(s) replaced by the branch taken" if inlined else "no If depends on it")
    notes.append(f"--constant-input {names}: no longer an input ({effect}"
                 + (f", {dropped} nodes that fed nothing dropped)" if dropped else ")"))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: the model with {names} fixed is invalid: {str(exc).strip().splitlines()[0]}") from None
    return removed


def inputs_deciding_ifs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Integer and bool inputs whose values alone decide a main-graph ``If``, each with those Ifs:
    the candidates for ``--constant-input`` (a condition on an input's shape is not one of them:
    static shapes decide those)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    integral = {v.name for v in graph.input if v.name not in initializers
                and helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).kind in "biu"}
    found: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type != "If":
            continue
        reached, pending, seen = set(), [node.input[0]], set()
        while pending and reached is not None:
            current = pending.pop()
            if current in seen or current in initializers or not current:
                continue
            seen.add(current)
            producer = producers.get(current)
            if producer is None:
                reached = reached | {current} if current in integral else None
            elif producer.op_type == "Shape" or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                    for a in producer.attribute):
                reached = None
            else:
                pending.extend(producer.input)
        for name in sorted(reached or ()):
            found.setdefault(name, []).append(node.name or node.output[0])
    return found


def _fit(name: str, value: np.ndarray, declared: onnx.ValueInfoProto) -> np.ndarray:
    """``value`` in the input's dtype and shape; ConfigError when it does not fit."""
    tensor_type = declared.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    value = np.asarray(value)
    cast = value.astype(dtype)
    if not np.array_equal(cast.astype(np.float64), value.astype(np.float64)):
        raise ConfigError(f"--constant-input {name}: {value.tolist()} does not fit the input's type {dtype}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if None not in dims and int(np.prod(dims)) == cast.size:
        return cast.reshape(dims)
    if cast.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims, cast.shape)):
        return cast
    if cast.size == 1:  # a scalar for an input of symbolic dims: one element along each
        return cast.reshape([1] * len(dims))
    shown = [d if d is not None else "?" for d in dims]
    raise ConfigError(f"--constant-input {name}: {cast.size} values do not fit the input's shape {shown}")


def inline_static_ifs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Inline the ``If`` nodes that the model's static shapes decide (``If(Shape(x)[0] == 1)``, as
    exporters write for squeezes and RNN batches): the shape-inferred model, and how many went."""
    total = 0
    while True:
        inlined = _inline_constant_ifs(model, _static_shapes(model))
        if not inlined:
            return model, total
        total += inlined
        _drop_dead_nodes(model.graph)
        del model.graph.value_info[:]
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    graph = model.graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor_type.shape.dim]
    return shapes


def _inline_constant_ifs(model: onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None) -> int:
    """Replace each main-graph ``If`` whose condition is computable from constants (and the static
    ``shapes`` of tensors, through ``Shape``) by its branch taken."""
    graph, inlined = model.graph, 0
    index = 0
    while index < len(graph.node):
        node = graph.node[index]
        condition = _constant_condition(model, node.input[0], shapes or {}) if node.op_type == "If" else None
        if condition is None:
            index += 1
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if condition else "else_branch"))
        replacement, initializers = _branch_nodes(graph, node, branch)
        del graph.node[index]
        for offset, inserted in enumerate(replacement):
            graph.node.insert(index + offset, inserted)
        graph.initializer.extend(initializers)
        index += len(replacement)
        inlined += 1
    return inlined


def _constant_condition(model: onnx.ModelProto, name: str, shapes: Mapping[str, list[int]]) -> bool | None:
    """The value of ``name`` when only initializers, constant nodes and static shapes feed it, else None."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    cone, needed, pending = [], set(), [name]
    while pending:
        current = pending.pop()
        if current in needed or current == "":
            continue
        needed.add(current)
        if current in initializers:
            continue
        node = producers.get(current)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None  # a graph input, or a subgraph: not a constant
        if node.op_type == "Shape" and node.input[0] in shapes:
            initializers[current] = numpy_helper.from_array(_shape_value(node, shapes[node.input[0]]), current)
            continue
        cone.append(node)
        pending.extend(node.input)
    from onnx.reference import ReferenceEvaluator

    order = {id(n): i for i, n in enumerate(graph.node)}
    cone = sorted({id(n): n for n in cone}.values(), key=lambda n: order[id(n)])
    probe = helper.make_model(
        helper.make_graph(cone, "condition", [], [helper.make_value_info(name, onnx.TypeProto())],
                          [initializers[n] for n in needed if n in initializers]),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        (value,) = ReferenceEvaluator(probe).run(None, {})
    except Exception:  # noqa: BLE001 - an op the reference runtime lacks: the If stays
        return None
    value = np.asarray(value)
    return bool(value.reshape(-1)[0]) if value.size == 1 else None


def _shape_value(node: onnx.NodeProto, dims: list[int]) -> np.ndarray:
    """What ``Shape`` returns for a tensor of ``dims`` (its opset-15 ``start``/``end`` included)."""
    attributes = {a.name: a.i for a in node.attribute}
    start, end = attributes.get("start", 0), attributes.get("end", len(dims))
    return np.asarray(dims[slice(start, end)], np.int64)


def _branch_nodes(graph: onnx.GraphProto, node: onnx.NodeProto,
                  branch: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The branch's nodes and initializers renamed into the main graph, writing the ``If``'s outputs."""
    taken = _all_names(graph, skip=node) | set(node.input) | set(node.output)
    local = [o for n in branch.node for o in n.output if o] + [i.name for i in branch.initializer]
    rename: dict[str, str] = {}
    for name in local:
        if name in taken:
            fresh, count = f"{node.name}/{name}", 0
            while fresh in taken:
                count += 1
                fresh = f"{node.name}/{name}_{count}"
            rename[name] = fresh
            taken.add(fresh)
    produced = {o for n in branch.node for o in n.output}
    identities, seen = [], set()
    for result, target in zip(branch.output, node.output):
        if result.name in produced and result.name not in seen and result.name not in rename:
            rename[result.name] = target  # the producing node writes the If's output itself
        else:  # an outer name, an initializer or an output listed twice
            identities.append(helper.make_node("Identity", [rename.get(result.name, result.name)], [target],
                                               name=f"{node.name}/{target}"))
        seen.add(result.name)
    nodes = []
    for original in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        _rename(copy, rename)
        nodes.append(copy)
    initializers = []
    for tensor in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = rename.get(tensor.name, tensor.name)
        initializers.append(copy)
    return nodes + identities, initializers


def _rename(node: onnx.NodeProto, rename: Mapping[str, str]) -> None:
    for i, name in enumerate(node.input):
        node.input[i] = rename.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = rename.get(name, name)
    for attribute in node.attribute:  # nested bodies read outer names too
        for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for inner in body.node:
                _rename(inner, rename)
            for output in body.output:
                output.name = rename.get(output.name, output.name)


def _all_names(graph: onnx.GraphProto, skip: onnx.NodeProto | None = None) -> set[str]:
    """Every value name ``graph`` uses, subgraphs included (but not the node ``skip``)."""
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        if node is skip:
            continue
        names.update(node.input)
        names.update(node.output)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                names |= _all_names(body)
    return names


def _drop_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove the nodes none of whose outputs reach a graph output (how many), and the initializers
    nothing reads any more."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
            for attribute in node.attribute:
                for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                    live |= _all_names(body)
    dropped = len(graph.node) - len(kept)
    if dropped:
        del graph.node[:]
        graph.node.extend(reversed(kept))
    unused = [i for i in graph.initializer if i.name not in live]
    for tensor in unused:  # the folded inputs' own values, the untaken branches' conditions
        graph.initializer.remove(tensor)
    return dropped
