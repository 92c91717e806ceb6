"""Pruning methods, registered by name: ``magnitude`` (unstructured) and ``channel`` (structured).

``magnitude`` zeroes the smallest weights of Conv/Gemm/MatMul (one global threshold, or the same
fraction per layer). The file keeps its size (dense storage) but the non-zero parameter count
drops; it pays off with sparse kernels or compression.

``channel`` removes whole output channels of a Conv (ranked by the L1 or L2 norm of their
filters) *and* the matching input channels of every consumer, walking through per-channel ops
(BatchNormalization, activations, pooling, Flatten after global pooling) to the next Conv or
Gemm. A Conv whose output reaches anything else (a residual Add, Concat, a graph output, a
grouped conv) cannot be pruned safely on its own: it is skipped and listed. The result really
is smaller: fewer parameters, fewer FLOPs, a smaller file, and it runs in onnxruntime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import ConfigError, ConversionError
from ..registry import Registry
from ..report import PruneReport
from .loader import LoadedModel

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Ops that keep channel c of their input in channel c of their output (axis 1, NCHW).
_CHANNELWISE_UNARY = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Identity",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Softplus", "Mish", "Gelu",
})


class Scope(str, Enum):
    GLOBAL = "global"  # one threshold over all layers: small layers may lose more than ``amount``
    PER_LAYER = "per-layer"  # every layer loses the same fraction


class Norm(str, Enum):
    L1 = "l1"
    L2 = "l2"


@dataclass(frozen=True)
class PruneConfig:
    """``amount``: fraction of weights (magnitude) or of output channels per layer (channel) to remove."""

    amount: float
    scope: Scope = Scope.GLOBAL
    norm: Norm = Norm.L1
    min_channels: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.amount < 1:
            raise ConfigError(f"prune amount {self.amount}: must be between 0 and 1 (exclusive)")
        if self.min_channels < 1:
            raise ConfigError(f"prune min_channels {self.min_channels}: must be >= 1")


class Pruner(ABC):
    """One pruning method: rewrites ``model`` in place and says what it did."""

    name: str

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @abstractmethod
    def apply(self, model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
        """Prune ``model`` in place; return (pruned layer -> what, skipped layer -> why)."""


PRUNERS: Registry[type[Pruner]] = Registry("pruning method")


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), name))
            return
    raise ConversionError(f"prune: initializer {name!r} vanished")  # pragma: no cover - internal invariant


def _weight_name(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The weight initializer of a Conv/Gemm/MatMul node (second input), if it is one."""
    if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
        return node.input[1]
    return None


@PRUNERS.register("magnitude")
class MagnitudePruner(Pruner):
    """Zero the ``amount`` fraction of smallest-magnitude weights (biases are left alone)."""

    name = "magnitude"

    def apply(self, model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
        inits = _initializers(model)
        names = sorted({w for n in model.graph.node if (w := _weight_name(n, inits))})
        if not names:
            return {}, {"(model)": "no Conv/Gemm/MatMul weight initializers"}
        arrays = {name: numpy_helper.to_array(inits[name]) for name in names}
        threshold = None
        if self.config.scope == Scope.GLOBAL:
            everything = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
            threshold = np.quantile(everything, self.config.amount)
        pruned = {}
        for name, array in arrays.items():
            cut = threshold if threshold is not None else np.quantile(np.abs(array), self.config.amount)
            mask = np.abs(array) <= cut
            _set_initializer(model, name, np.where(mask, 0, array))
            pruned[name] = f"{mask.mean():.1%} of {array.size} weights zeroed"
        return pruned, {}


@PRUNERS.register("channel")
class ChannelPruner(Pruner):
    """Remove whole Conv output channels (by filter norm) and the matching consumer inputs."""

    name = "channel"

    def apply(self, model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
        pruned: dict[str, str] = {}
        skipped: dict[str, str] = {}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        for conv in convs:
            label = conv.name or conv.output[0]
            reason = self._prune_one(model, conv)
            if reason.startswith("removed"):
                pruned[label] = reason
            else:
                skipped[label] = reason
        return pruned, skipped

    def _prune_one(self, model: onnx.ModelProto, conv: onnx.NodeProto) -> str:
        inits = _initializers(model)
        weight_name = _weight_name(conv, inits)
        if weight_name is None:
            return "weight is not an initializer"
        if _attr(conv, "group", 1) != 1:
            return "grouped/depthwise conv"
        weight = numpy_helper.to_array(inits[weight_name])
        out_channels = weight.shape[0]
        keep_count = max(self.config.min_channels, int(round(out_channels * (1 - self.config.amount))))
        if keep_count >= out_channels:
            return f"only {out_channels} output channels"
        plan = _consumer_plan(model, conv.output[0], inits)
        if isinstance(plan, str):
            return plan
        shared = _shared_initializers(model, [weight_name, *(conv.input[2:3]), *plan.channel_params, *plan.sink_weights])
        if shared:
            return f"initializer {shared} is shared with other nodes"
        order = 1 if self.config.norm == Norm.L1 else 2
        norms = np.linalg.norm(weight.reshape(out_channels, -1), ord=order, axis=1)
        keep = np.sort(np.argsort(-norms, kind="stable")[:keep_count])
        _set_initializer(model, weight_name, weight[keep])
        if len(conv.input) > 2 and conv.input[2]:
            _set_initializer(model, conv.input[2], numpy_helper.to_array(inits[conv.input[2]])[keep])
        for name in plan.channel_params:
            _set_initializer(model, name, numpy_helper.to_array(inits[name])[keep])
        for node, name in plan.sinks:
            array = numpy_helper.to_array(inits[name])
            if node.op_type == "Conv":
                _set_initializer(model, name, array[:, keep])
            else:  # Gemm after global pooling + Flatten: features are channels
                axis = 0 if not _attr(node, "transB", 0) else 1
                _set_initializer(model, name, np.take(array, keep, axis=axis))
        return f"removed {out_channels - keep_count} of {out_channels} output channels"


@dataclass
class _Plan:
    channel_params: list[str] = field(default_factory=list)  # per-channel initializers (BN) to slice
    sinks: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)  # consumers whose inputs shrink
    sink_weights: list[str] = field(default_factory=list)


def _consumer_plan(model: onnx.ModelProto, tensor: str, inits: dict[str, onnx.TensorProto]) -> _Plan | str:
    """Follow ``tensor`` through channel-wise ops to the consumers that absorb the pruning."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    plan = _Plan()
    frontier = [(tensor, False)]  # (tensor, spatially pooled to 1x1 already)
    seen = set()
    while frontier:
        name, pooled = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs:
            return "its channels reach a graph output"
        users = consumers.get(name, [])
        if not users:
            return "its output is unused"
        for node in users:
            op = node.op_type
            if op == "Conv" and node.input[0] == name and not pooled:
                weight = _weight_name(node, inits)
                if weight is None or _attr(node, "group", 1) != 1:
                    return f"consumer {node.name or op} is a grouped conv or has no weight initializer"
                plan.sinks.append((node, weight))
                plan.sink_weights.append(weight)
            elif op == "BatchNormalization" and node.input[0] == name:
                if not all(i in inits for i in node.input[1:5]):
                    return f"consumer {node.name or op} has non-constant parameters"
                plan.channel_params.extend(node.input[1:5])
                frontier.append((node.output[0], pooled))
            elif op in _CHANNELWISE_UNARY and node.input[0] == name and len(node.output) >= 1:
                if op == "Clip" and any(i and i not in inits for i in node.input[1:]):
                    return f"consumer {node.name or op} has non-constant bounds"
                frontier.append((node.output[0], pooled or op.startswith("Global")))
            elif op == "Flatten" and pooled and _attr(node, "axis", 1) == 1:
                frontier.append((node.output[0], True))
            elif op == "Gemm" and pooled and node.input[0] == name:
                weight = _weight_name(node, inits)
                if weight is None:
                    return f"consumer {node.name or op} has no weight initializer"
                plan.sinks.append((node, weight))
                plan.sink_weights.append(weight)
            else:
                return f"its channels reach {op} {node.name!r}, which cannot be pruned safely alone"
    return plan


def _shared_initializers(model: onnx.ModelProto, names: list[str]) -> list[str]:
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return [n for n in dict.fromkeys(names) if uses.get(n, 0) > 1]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def count_params(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, non-zero parameters) over float initializers."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            total += array.size
            nonzero += int(np.count_nonzero(array))
    return total, nonzero


def count_flops(model: onnx.ModelProto) -> int:
    """Multiply-accumulates × 2 of Conv/Gemm/MatMul, from inferred static shapes."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    flops = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0], [])
        if node.op_type == "Conv" and len(node.input) > 1:
            w = shapes.get(node.input[1], [])
            if w and out:
                flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0], [])
            if a and out:
                k = a[-1] if not (node.op_type == "Gemm" and _attr(node, "transA", 0)) else a[0]
                flops += 2 * int(np.prod(out)) * k
    return flops


def prune_model(loaded: LoadedModel, method: str, config: PruneConfig, work_dir: Path) -> tuple[LoadedModel, PruneReport]:
    """Prune ``loaded`` with the named method; return the pruned model (saved in ``work_dir``) and what was removed."""
    pruner = PRUNERS.get(method)(config)
    amount = config.amount
    model = loaded.load()
    params_before, nonzero_before = count_params(model)
    flops_before = count_flops(model)
    pruned, skipped = pruner.apply(model)
    if not pruned:
        raise ConversionError(f"prune {method}:{amount}: nothing could be pruned ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    # Channel counts changed: stale intermediate shapes would contradict the new weights.
    del model.graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        model = shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as exc:
        raise ConversionError(f"prune {method}: the pruned graph is invalid: {str(exc).splitlines()[0]}") from None
    out = work_dir / f"model.pruned-{method}.onnx"
    onnx.save(model, str(out))
    _check_runs(out, method)
    params_after, nonzero_after = count_params(model)
    report = PruneReport(method=method, amount=amount, params_before=params_before, params_after=params_after,
                         nonzero_before=nonzero_before, nonzero_after=nonzero_after, flops_before=flops_before,
                         flops_after=count_flops(model), size_before=loaded.path.stat().st_size,
                         size_after=out.stat().st_size, pruned=pruned, skipped=skipped)
    result = LoadedModel(path=out, inputs=loaded.inputs, outputs=loaded.outputs, source_sha256=loaded.source_sha256,
                         opset=loaded.opset, source_opset=loaded.source_opset, notes=list(loaded.notes),
                         constants=loaded.constants)
    return result, report


def _check_runs(path: Path, method: str) -> None:
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure means our rewrite broke the graph
        raise ConversionError(f"prune {method}: onnxruntime cannot load the pruned model: {str(exc).splitlines()[0]}") from None
