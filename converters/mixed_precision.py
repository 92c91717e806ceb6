"""Accuracy-aware mixed precision: INT8 everywhere except the nodes that hurt accuracy most.

1. Quantize everything; if the accuracy drop already meets the target, done.
2. Rank the quantized nodes by the error they *add*: relative L2 error of the node's output
   against FP32, minus the largest error already present on its inputs (error accumulates down
   the graph; a node is only to blame for its own increase).
3. Bisect on k, the number of top-ranked nodes kept in FP32, for the smallest k that meets the
   target (assumes more FP32 nodes never hurt, which holds closely in practice).
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
from .targets.base import ExportResult, Feeds
from .toollog import quiet
from .validate import accuracy_drop


@dataclass
class MixedResult:
    result: ExportResult | None
    validation: Validation | None
    kept_fp32: list[str]
    trials: list[dict] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)
    reached: bool = False


def search(export: Callable[[list[str]], ExportResult], evaluate: Callable[[ExportResult], Validation],
           fp32_path: Path, samples: Sequence[Feeds], max_drop: float) -> MixedResult:
    """Smallest set of top-ranked nodes to keep in FP32 so the accuracy drop is ≤ ``max_drop`` points."""
    trials: list[dict] = []
    cache: dict[int, tuple[ExportResult, Validation]] = {}

    def attempt(kept: list[str]) -> tuple[ExportResult, Validation, float]:
        result = export(kept)
        validation = evaluate(result)
        what, drop = accuracy_drop(validation)
        trials.append({"kept_fp32": len(kept), "drop_points": round(drop, 4), "measure": what})
        return result, validation, drop

    result, validation, drop = attempt([])
    if drop <= max_drop:
        return MixedResult(result, validation, [], trials, reached=True)
    ranking = rank_nodes(fp32_path, result.files[0], samples[:4])
    names = [name for name, _ in ranking]
    if not names:  # nothing measurable to keep in FP32: plain INT8 is all there is
        return MixedResult(None, None, [], trials, ranking, reached=False)
    low, high = 0, len(names)  # invariant: k=low fails; k=high unknown until tried
    result_high, validation_high, drop_high = attempt(names)
    if drop_high > max_drop:
        return MixedResult(result_high, validation_high, names, trials, ranking, reached=False)
    cache[high] = (result_high, validation_high)
    while high - low > 1:
        mid = (low + high) // 2
        result_mid, validation_mid, drop_mid = attempt(names[:mid])
        if drop_mid <= max_drop:
            high = mid
            cache[high] = (result_mid, validation_mid)
        else:
            low = mid
    result, validation = cache[high]
    # Each export rewrites the same file: re-export the winner unless it was the last one written.
    if trials[-1]["kept_fp32"] != high:
        result, validation, _ = attempt(names[:high])
    return MixedResult(result, validation, names[:high], trials, ranking, reached=True)


def rank_nodes(fp32_path: Path, quantized_path: Path, samples: Sequence[Feeds]) -> list[tuple[str, float]]:
    """Quantized nodes of ``quantized_path`` ranked by the relative error they add, worst first."""
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


def _weight_errors(quantized: onnx.ModelProto, reference: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> dict[str, float]:
    """Relative L2 error of each node's dequantized INT8 weight against the FP32 weight."""
    from onnx import numpy_helper

    q_inits = {t.name: t for t in quantized.graph.initializer}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    errors = {}
    for node in nodes:
        for name in node.input[1:2]:  # Conv/Gemm/MatMul weight position
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in q_inits:
                continue
            original = ref_inits.get(dq.input[0].removesuffix("_quantized"))
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
    return float(np.linalg.norm(ref - got) / max(np.linalg.norm(ref), 1e-12))
