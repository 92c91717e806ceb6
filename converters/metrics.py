"""The accuracy measure a variant is judged by, chosen by what the model outputs (or by ``--metric``).

Every measure is a :class:`TaskMetric`: a figure in [0, 1], higher is better, computed over all
validation outputs of a variant; the gate compares it with the same figure of FP32 (see
``validate.accuracy_drop``). Agreement measures compare with the FP32 outputs, so FP32 scores 1:

- ``top1``: class scores -> how often the top class (per sample, per position, per pixel) agrees
  with FP32 (with ``--labels``: top-1 accuracy against the labels);
- ``cosine``: embeddings and other values -> mean per-sample cosine similarity to FP32;
- ``f1``: dense probability maps (detectors, segmenters) -> F1 of the maps thresholded at
  0.3/0.5/0.7 against FP32's, tolerant of one-pixel shifts and of values right at a threshold
  (:func:`map_f1`: what a detector keeps, not every pixel's value);
- ``module:function``: a user's own ``function(outputs) -> float`` over the list of output dicts.

Without ``--metric`` the default follows the first output's kind (:func:`output_kind`): class
scores (a Softmax/LogSoftmax, a name like ``logits``/``probs``, or a plain ``[N, C]`` head) ->
``top1``; a map of values in [0, 1] with two spatial axes (or a Sigmoid producing one) -> ``f1``;
embeddings (normalised, pooled, hidden states, or names like ``embedding``) and anything else ->
``cosine``. Argmax agreement over embedding dimensions means nothing, and cosine over a whole
probability map rejects detectors whose detections did not move: the kind decides.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import onnx

from ..errors import ConfigError

Outputs = dict[str, np.ndarray]

BUILTIN = ("top1", "cosine", "f1")
MAP_THRESHOLDS = (0.3, 0.5, 0.7)
MAP_MARGIN = 0.05  # a pixel is found where the other map is above threshold - margin (within one pixel)
_SHAPE_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"})
_CLASS_WORDS = ("logit", "prob", "class", "score", "label", "pred", "softmax", "cls")
_EMBEDDING_WORDS = ("embed", "hidden", "pool", "feature", "vector", "sentence", "encod", "token", "feat")
_NORM_OPS = frozenset({"LpNormalization", "LayerNormalization", "ReduceMean", "Tanh", "GlobalAveragePool"})


@dataclass(frozen=True)
class TaskMetric:
    """A task figure in [0, 1], higher is better, computed from all validation outputs of a variant.

    ``fn`` receives one outputs dict per validation sample (caller names and layout).
    ``against_fp32``: the figure measures agreement with FP32's own outputs (the built-in
    defaults), so every change counts against it; a task figure against the truth can net changes out.
    """

    name: str
    fn: Callable[[Sequence[Outputs]], float]
    against_fp32: bool = False

    def __call__(self, outputs: Sequence[Outputs]) -> float:
        return float(self.fn(outputs))


class OutputKind(str, Enum):
    CLASS_SCORES = "class scores"
    PROBABILITY_MAP = "probability map"
    EMBEDDING = "embedding"
    VALUES = "values"
    INTEGERS = "integers"  # class ids, token ids, counts: compared exactly


@dataclass(frozen=True)
class Judged:
    """Which output a default metric judges, what kind it is, and its class axis (class scores)."""

    output: str
    kind: OutputKind
    axis: int = -1


def output_kind(model: onnx.ModelProto, name: str, reference: Sequence[np.ndarray]) -> Judged:
    """What the output ``name`` holds, from its producer, its name and its FP32 values."""
    first = np.asarray(reference[0])
    if first.dtype.kind in "iub":
        return Judged(name, OutputKind.INTEGERS)
    producer = _producer(model.graph, name)
    op = producer.op_type if producer is not None else ""
    lowered = name.lower()
    spatial = first.ndim >= 3 and first.shape[-1] >= 8 and first.shape[-2] >= 8
    if op in ("Softmax", "LogSoftmax"):
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
        return Judged(name, OutputKind.CLASS_SCORES, axis)
    in_unit_range = all(float(np.min(r)) >= 0.0 and float(np.max(r)) <= 1.0 for r in reference)
    if spatial and (op == "Sigmoid" or in_unit_range):
        return Judged(name, OutputKind.PROBABILITY_MAP)
    if any(w in lowered for w in _EMBEDDING_WORDS) or op in _NORM_OPS or _normalises(model.graph, producer):
        return Judged(name, OutputKind.EMBEDDING)
    if any(w in lowered for w in _CLASS_WORDS) and first.ndim in (2, 3) and first.shape[-1] >= 2:
        return Judged(name, OutputKind.CLASS_SCORES)
    if first.ndim == 2 and first.shape[1] >= 2:
        return Judged(name, OutputKind.CLASS_SCORES)  # a plain [N, C] head
    return Judged(name, OutputKind.VALUES)


def default_metric(model: onnx.ModelProto, reference: Sequence[Outputs]) -> TaskMetric:
    """The measure for the first output's kind (see the module docstring)."""
    name = next(iter(reference[0]))
    judged = output_kind(model, name, [r[name] for r in reference])
    if judged.kind == OutputKind.CLASS_SCORES:
        return top1_agreement(reference, name, judged.axis)
    if judged.kind == OutputKind.PROBABILITY_MAP:
        return map_f1(reference, name)
    if judged.kind == OutputKind.INTEGERS:
        return exact_agreement(reference, name)
    return cosine(reference, name)


def from_spec(spec: str, model: onnx.ModelProto, reference: Sequence[Outputs], labels: np.ndarray | None) -> TaskMetric:
    """``--metric`` (``top1``, ``cosine``, ``f1`` or ``module:function``) as a metric; ConfigError if unusable."""
    name = next(iter(reference[0]))
    if spec == "top1":
        if labels is not None:
            return top1_accuracy(labels, name)
        return top1_agreement(reference, name, output_kind(model, name, [r[name] for r in reference]).axis)
    if spec == "cosine":
        return cosine(reference, name)
    if spec == "f1":
        return map_f1(reference, name)
    if ":" not in spec:
        raise ConfigError(f"--metric {spec!r}: expected one of {', '.join(BUILTIN)} or module:function")
    metric = _entry_point(spec)
    check(metric, reference)
    return metric


def check(metric: TaskMetric, reference: Sequence[Outputs]) -> float:
    """``metric`` on the FP32 outputs, or a ConfigError saying what it did instead of a figure."""
    try:
        value = metric(reference)
    except Exception as exc:  # noqa: BLE001 - the user's code: say what it raised, in one line
        raise ConfigError(f"metric {metric.name}: raised {type(exc).__name__} on the FP32 outputs: "
                          f"{_first_line(exc)}") from None
    if not math.isfinite(value):
        raise ConfigError(f"metric {metric.name}: returned {value} on the FP32 outputs; expected a finite number")
    return value


def top1_accuracy(labels: np.ndarray, output: str | None = None) -> TaskMetric:
    """Fraction of samples whose top class (first output, or ``output``) equals the label."""

    def accuracy(outputs: Sequence[Outputs]) -> float:
        key = output or next(iter(outputs[0]))
        predictions = np.concatenate([np.asarray(o[key]).reshape(len(o[key]), -1).argmax(axis=1) for o in outputs])
        return float(np.mean(predictions == labels))

    return TaskMetric("top1_accuracy", accuracy)


def top1_agreement(reference: Sequence[Outputs], output: str, axis: int = -1) -> TaskMetric:
    expected = [np.asarray(r[output]).argmax(axis=axis) for r in reference]

    def agreement(outputs: Sequence[Outputs]) -> float:
        return float(np.mean(np.concatenate([(np.asarray(o[output]).argmax(axis=axis) == e).ravel()
                                             for o, e in zip(outputs, expected)])))

    return TaskMetric("top-1 agreement", agreement, against_fp32=True)


def exact_agreement(reference: Sequence[Outputs], output: str) -> TaskMetric:
    def agreement(outputs: Sequence[Outputs]) -> float:
        return float(np.mean(np.concatenate([(np.asarray(o[output]) == r[output]).ravel() for o, r in zip(outputs, reference)])))

    return TaskMetric("exact agreement", agreement, against_fp32=True)


def cosine(reference: Sequence[Outputs], output: str) -> TaskMetric:
    def similarity(outputs: Sequence[Outputs]) -> float:
        return float(np.mean([_cosine(r[output], o[output]) for r, o in zip(reference, outputs)]))

    return TaskMetric("cosine similarity", similarity, against_fp32=True)


def map_f1(reference: Sequence[Outputs], output: str, thresholds: Sequence[float] = MAP_THRESHOLDS,
           margin: float = MAP_MARGIN) -> TaskMetric:
    """Agreement of thresholded maps, tolerant where a detector or segmenter cannot tell the difference.

    For each threshold ``t``, a pixel above ``t`` in one map is found when the other map is above
    ``t - margin`` at that pixel or one of its 8 neighbours: an object right at the threshold, or an
    edge moved by a pixel, is not a lost detection. F1 = found pixels of both maps / pixels above
    ``t`` in both, averaged over the thresholds where either map has any.
    """

    def f1(outputs: Sequence[Outputs]) -> float:
        scores = []
        for threshold in thresholds:
            found = total = 0
            for r, o in zip(reference, outputs):
                for a, b in zip(_planes(r[output]), _planes(o[output])):
                    if not np.all(np.isfinite(b)):
                        b = np.zeros_like(b)
                    found += int(np.sum((a > threshold) & (_dilate(b) > threshold - margin)))
                    found += int(np.sum((b > threshold) & (_dilate(a) > threshold - margin)))
                    total += int(np.sum(a > threshold)) + int(np.sum(b > threshold))
            if total:
                scores.append(found / total)
        return float(np.mean(scores)) if scores else 1.0

    return TaskMetric("thresholded-map F1", f1, against_fp32=True)


def _planes(array: np.ndarray) -> list[np.ndarray]:
    """The 2-D maps of an [..., H, W] output (every batch item and channel on its own)."""
    values = np.asarray(array, np.float64)
    return list(values.reshape(-1, *values.shape[-2:])) if values.ndim >= 2 else [values.reshape(1, -1)]


def _dilate(plane: np.ndarray) -> np.ndarray:
    """Each pixel's maximum over its 3x3 neighbourhood."""
    padded = np.pad(plane, 1, mode="edge")
    height, width = plane.shape
    return np.max([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    if not np.all(np.isfinite(y)):
        return 0.0
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / norm) if norm > 0 else (1.0 if np.array_equal(x, y) else 0.0)


def _entry_point(spec: str) -> TaskMetric:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError or whatever the module raises on import
        raise ConfigError(f"--metric {spec}: cannot import module {module_name!r} ({type(exc).__name__})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--metric {spec}: module {module_name!r} has no function {attr!r}")
    return TaskMetric(spec, fn)


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    """The node computing ``tensor``, looking through reshapes, transposes and casts."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(tensor)
    for _ in range(16):
        if node is None or node.op_type not in _SHAPE_OPS or not node.input:
            return node
        node = producers.get(node.input[0])
    return node


def _normalises(graph: onnx.GraphProto, node: onnx.NodeProto | None) -> bool:
    """``x / norm(x)``: a Div whose divisor comes from a norm (ReduceL2, Sqrt of a sum of squares)."""
    if node is None or node.op_type != "Div" or len(node.input) < 2:
        return False
    producers = {o: n for n in graph.node for o in n.output}
    frontier, seen = [node.input[1]], 0
    while frontier and seen < 8:
        producer = producers.get(frontier.pop())
        seen += 1
        if producer is None:
            continue
        if producer.op_type in ("ReduceL2", "Sqrt", "ReduceSumSquare", "LpNormalization"):
            return True
        frontier.extend(producer.input[:1])
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
