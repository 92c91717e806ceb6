"""Which nodes to keep in FP32: per-node sensitivity rankings and the search over them.

Shared by every target (a target only has to honour ``request.nodes_to_exclude``, ONNX node names):

- :func:`int8_ranking`: the quantized nodes of a QDQ model ranked by the relative L2 error each
  *adds* (its output's error against FP32 minus the largest error already on its inputs, plus its
  own weight's quantization error: error accumulates down the graph);
- :func:`fp16_ranking`: every float node ranked the same way for FP16, and first of all a node
  that makes or takes a value outside FP16's range (|x| > 65504 in FP32): detectors with large
  intermediate activations overflow there;
- :func:`isolated_ranking`: for what the QDQ ranking cannot read (dynamic INT8 has no Q/DQ pairs
  to probe; nodes inside ``If``/``Loop`` bodies), each quantizable node ranked by the output
  error of quantizing it alone; one export per node, so only for graphs with few of them;
- :func:`keep_fp32_search`: bisect on k, the number of top-ranked nodes kept in FP32, for the
  smallest k that meets the accuracy budget (more FP32 nodes never hurt, which holds closely).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..manifest import Validation
from ..report import MixedTrial
from .targets.base import ExportResult, Feeds
from .toollog import quiet
from .validate import accuracy_drop, judged_drop

FP16_MAX = 65504.0
# What onnxruntime's dynamic quantizer can quantize; isolated_ranking ranks nodes of these types.
DYNAMIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "LSTM", "GRU", "Gather", "Attention", "EmbedLayerNormalization")
ISOLATED_LIMIT = 32  # quantizable nodes at most: isolated_ranking exports the model once per node


@dataclass
class KeepSearch:
    """The search's outcome: the best export (None if nothing met the budget), and what it tried."""

    result: ExportResult | None
    validation: Validation | None
    kept_fp32: list[str]
    trials: list[MixedTrial] = field(default_factory=list)
    reached: bool = False


def keep_fp32_search(export: Callable[[list[str]], ExportResult], evaluate: Callable[[ExportResult], Validation],
                     ranking: Sequence[tuple[str, float]], max_drop: float) -> KeepSearch:
    """Fewest top-ranked nodes to keep in FP32 for an accuracy drop <= ``max_drop`` points.

    Keeping none is known to miss the budget (the plain candidate was tried first). Every call of
    ``export`` must write to its own place: the winner's files are the ones returned.
    """
    names = [name for name, _ in ranking]
    trials: list[MixedTrial] = []
    if not names:
        return KeepSearch(None, None, [], trials)

    def attempt(k: int) -> tuple[ExportResult, Validation, bool]:
        result = export(names[:k])
        validation = evaluate(result)
        what, drop = accuracy_drop(validation)
        trials.append(MixedTrial(kept_fp32=k, drop_points=round(drop, 4), measure=what))
        return result, validation, judged_drop(validation) <= max_drop

    best = attempt(len(names))
    if not best[2]:
        return KeepSearch(best[0], best[1], names, trials)
    low, high = 0, len(names)  # invariant: k=low misses the budget, k=high meets it
    while high - low > 1:
        mid = (low + high) // 2
        trial = attempt(mid)
        if trial[2]:
            high, best = mid, trial
        else:
            low = mid
    return KeepSearch(best[0], best[1], names[:high], trials, reached=True)


def fp16_ranking(fp32_path: Path, samples: Sequence[Feeds]) -> list[tuple[str, float]]:
    """Float nodes ranked by the error FP16 adds, overflowing ones first (score ``inf``)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    floats = {v.name for v in [*model.graph.value_info, *model.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    candidates = [n for n in model.graph.node if n.name and n.op_type not in ("Constant", "Shape", "Cast")
                  and n.output and n.output[0] in floats]
    if not candidates:
        return []
    tensors = sorted({n.output[0] for n in candidates})
    producer = {n.output[0]: n for n in candidates}
    with tempfile.TemporaryDirectory(prefix="edge-sdk-fp16-") as tmp:
        reference = _run_with_outputs(model, tensors, samples, Path(tmp) / "ref.onnx")
        try:
            with quiet():
                half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
            converted = _run_with_outputs(half, tensors, samples, Path(tmp) / "fp16.onnx")
        except Exception:  # noqa: BLE001 - no FP16 run: rank by overflow alone
            converted = {}
    overflow = {t for t in tensors if any(np.max(np.abs(v)) > FP16_MAX for v in reference[t] if v.size)}
    error = {t: _relative_error(reference[t], converted[t]) for t in converted}
    ranking = []
    for node in candidates:
        out = node.output[0]
        if out in overflow or overflow.intersection(node.input):  # it makes or takes a value FP16 cannot hold
            ranking.append((node.name, float("inf")))
            continue
        inherited = max((error.get(i, 0.0) for i in node.input if i in producer), default=0.0)
        own = error.get(out, 0.0)
        ranking.append((node.name, own if np.isinf(inherited) else max(own - inherited, 0.0)))
    return [item for item in sorted(ranking, key=lambda item: -item[1]) if item[1] > 0]


def int8_ranking(fp32_path: Path, quantized_path: Path, samples: Sequence[Feeds]) -> list[tuple[str, float]]:
    """Quantized nodes of the QDQ model ``quantized_path`` ranked by the relative error they add, worst first."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quantized = onnx.load(str(quantized_path))
    dq_source = {}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            dq_source[node.output[0]] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
    # Every node that computes on dequantized inputs is a candidate, not only Conv/MatMul: QDQ
    # also quantizes activations around Add/Pool/Concat, and their error can dominate.
    candidates = [n for n in quantized.graph.node
                  if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name
                  and any(i in dq_source for i in n.input)]
    if not candidates:
        return []
    with tempfile.TemporaryDirectory(prefix="edge-sdk-mixed-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with quiet():
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # same fallback as quantize.py: the quantizer then saw the plain model
            prepared = fp32_path
        reference = onnx.load(str(prepared))
        ref_tensors = {o for n in reference.graph.node for o in n.output}
        # The quantizer renames a graph output's producer ("logits" -> "logits_QuantizeLinear_Input"
        # followed by Q/DQ back to "logits"): follow such chains to find the reference tensor.
        alias = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in quantized.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for node in quantized.graph.node:
            if node.op_type == "QuantizeLinear":
                for dq in consumers.get(node.output[0], []):
                    if dq.op_type == "DequantizeLinear" and dq.output[0] in ref_tensors:
                        alias[node.input[0]] = dq.output[0]
        # A node is judged by what its consumers see: its output after its own Q/DQ pair, if any.
        seen_as = {}
        for node in candidates:
            out = node.output[0]
            seen_as[node.name] = next((dq.output[0] for q in consumers.get(out, []) if q.op_type == "QuantizeLinear"
                                       for dq in consumers.get(q.output[0], []) if dq.op_type == "DequantizeLinear"), out)
        pairs = {}  # quantized-model tensor -> reference tensor
        for node in candidates:
            out = node.output[0]
            ref_out = out if out in ref_tensors else alias.get(out)
            if ref_out is not None:
                pairs[seen_as[node.name]] = ref_out
            for name in (dq_source.get(i) for i in node.input if dq_source.get(i)):
                ref_name = name if name in ref_tensors else alias.get(name)
                if ref_name is not None:
                    pairs[name] = ref_name
        ref_values = _run_with_outputs(reference, sorted(set(pairs.values())), samples, Path(tmp) / "ref.onnx")
        q_values = _run_with_outputs(quantized, sorted(pairs), samples, Path(tmp) / "q.onnx")
    error = {name: _relative_error(ref_values[ref_name], q_values[name]) for name, ref_name in pairs.items()}
    # Activation errors hide a badly quantized weight whose damage shows only downstream (per-tensor
    # scales on depthwise convs): add each node's own weight quantization error.
    weight_error = _weight_errors(quantized, reference, candidates)
    ranking = []
    for node in candidates:
        out_error = error.get(seen_as[node.name])
        if out_error is None:
            continue
        in_error = max((error.get(dq_source.get(i), 0.0) for i in node.input if dq_source.get(i)), default=0.0)
        ranking.append((node.name, max(out_error - in_error, 0.0) + weight_error.get(node.name, 0.0)))
    return sorted(ranking, key=lambda item: -item[1])


def isolated_ranking(fp32_path: Path, export: Callable[[list[str]], Path], samples: Sequence[Feeds]) -> list[tuple[str, float]]:
    """Quantizable nodes (of ``DYNAMIC_OP_TYPES``, with a weight) ranked by the output error of
    quantizing each alone, worst first.

    ``export(kept_fp32)`` writes the candidate with those nodes kept FP32 and returns its ONNX
    file. Nodes quantizing alone changes nothing (the recipe skips them) are left out; a graph
    with more than ``ISOLATED_LIMIT`` quantizable nodes gets no ranking.
    """
    from .loader import all_initializers
    from .quantize import all_nodes

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {t.name for t in all_initializers(graph)}
    nodes = [n.name for n in all_nodes(graph) if n.op_type in DYNAMIC_OP_TYPES and weights.intersection(n.input)]
    if not nodes or len(nodes) > ISOLATED_LIMIT:
        return []
    reference = _final_outputs(fp32_path, samples)
    ranking = []
    for node in nodes:
        quantized = _final_outputs(export([n for n in nodes if n != node]), samples)
        ranking.append((node, _relative_error(reference, quantized)))
    return [item for item in sorted(ranking, key=lambda item: -item[1]) if item[1] > 0]


def _final_outputs(path: Path, samples: Sequence[Feeds]) -> list[np.ndarray]:
    """Every float graph output of every sample, flattened, in order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [np.asarray(value, np.float64).ravel() for sample in samples for value in session.run(None, sample)
            if np.issubdtype(np.asarray(value).dtype, np.floating)]


def _weight_errors(quantized: onnx.ModelProto, reference: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> dict[str, float]:
    """Relative L2 error of each node's dequantized INT8 weight against the FP32 weight."""
    from onnx import numpy_helper

    q_inits = {t.name: t for t in quantized.graph.initializer}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    ref_nodes = {n.name: n for n in reference.graph.node}  # the quantizer keeps the nodes' names
    producers = {o: n for n in quantized.graph.node for o in n.output}
    errors = {}
    for node in nodes:
        for name in node.input[1:2]:  # Conv/Gemm/MatMul weight position
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in q_inits:
                continue
            ref_node = ref_nodes.get(node.name)
            original = ref_inits.get(ref_node.input[1]) if ref_node is not None and len(ref_node.input) > 1 else None
            if original is None:
                continue
            w = numpy_helper.to_array(original).astype(np.float64)
            q = numpy_helper.to_array(q_inits[dq.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(q_inits[dq.input[1]]).astype(np.float64)
            zero = numpy_helper.to_array(q_inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] in q_inits else 0.0
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            if np.ndim(scale) == 1 and w.ndim > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
            if q.shape != w.shape:
                continue
            errors[node.name] = float(np.linalg.norm(w - (q - zero) * scale) / max(np.linalg.norm(w), 1e-12))
    return errors


def _run_with_outputs(model: onnx.ModelProto, names: list[str], samples: Sequence[Feeds], path: Path) -> dict[str, list[np.ndarray]]:
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Graph optimisations would fuse away the intermediate tensors we want to read.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for sample in samples:
        for name, value in zip(names, session.run(names, sample)):
            values[name].append(np.asarray(value, np.float64).ravel())
    return values


def _relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    ref = np.concatenate(reference)
    got = np.concatenate(candidate)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
