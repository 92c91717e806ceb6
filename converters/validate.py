"""Validation of a variant against the FP32 ONNX original, and the benchmark gate.

Every artifact is run through its own runtime backend on held-out inputs and compared with the
FP32 outputs: max/mean absolute error, cosine similarity, top-1 agreement (first output, when it
is [N, classes]) and the task metric when labels are given. Latency is the median of many runs
on the build machine. :func:`gate` rejects a variant outside its accuracy tolerance or slower
than FP32 (its docstring states the exact rule); a rejected variant never becomes a profile's default.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..manifest import Validation
from ..runtime.backends.base import Session
from ..types import Precision
from .targets.base import Feeds

Outputs = dict[str, np.ndarray]


def run_all(session: Session, samples: Sequence[Feeds]) -> list[Outputs]:
    return [session.run(sample) for sample in samples]


def median_latency_ms(session: Session, sample: Feeds, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``session.run`` on one sample (batch as the model defines it)."""
    for _ in range(warmup):
        session.run(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(sample)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def top1_accuracy(outputs: Sequence[Outputs], labels: np.ndarray) -> float:
    """Fraction of samples whose first output's argmax equals the label."""
    predictions = np.concatenate([_classes(o) for o in outputs])
    return float(np.mean(predictions == labels))


@dataclass(frozen=True)
class TaskMetric:
    """A task figure in [0, 1], higher is better, computed from all validation outputs of a variant.

    ``fn`` receives one outputs dict per validation sample (caller names and layout), e.g. top-1
    accuracy against labels, or detection recall after decoding boxes.
    """

    name: str
    fn: Callable[[Sequence[Outputs]], float]

    def __call__(self, outputs: Sequence[Outputs]) -> float:
        return float(self.fn(outputs))


def top1_metric(labels: np.ndarray) -> TaskMetric:
    return TaskMetric("top1_accuracy", lambda outputs: top1_accuracy(outputs, labels))


def _numeric(outputs: Outputs) -> np.ndarray:
    return np.concatenate([outputs[k].ravel().astype(np.float64) for k in sorted(outputs) if _is_numeric(outputs[k])]
                          or [np.empty(0)])


def _is_numeric(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind in "biuf"


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs], metric: TaskMetric | None = None) -> Validation:
    """Error figures of ``candidate`` against ``reference`` (same samples, same order). Outputs
    that are not numbers (strings: labels, tokens) have no error, only agreement: they count as
    top-1 agreement, the share of their elements equal to the reference's."""
    ref = np.concatenate([_numeric(o) for o in reference])
    got = np.concatenate([_numeric(o) for o in candidate])
    diff = np.abs(ref - got)
    finite = bool(np.all(np.isfinite(got)))
    norm = np.linalg.norm(ref) * np.linalg.norm(got)
    cosine = float(ref @ got / norm) if norm > 0 and finite else (1.0 if np.array_equal(ref, got) else 0.0)
    validation = Validation(
        samples=len(reference),
        max_abs_error=(float(diff.max()) if diff.size else 0.0) if finite else float("inf"),
        mean_abs_error=(float(diff.mean()) if diff.size else 0.0) if finite else float("inf"),
        cosine_similarity=cosine,
    )
    agreement = []
    if _classes(reference[0]) is not None:
        agreement.append(np.concatenate([_classes(r) == _classes(c) for r, c in zip(reference, candidate)]))
    agreement += [np.asarray(r[k]).ravel() == np.asarray(c[k]).ravel() for r, c in zip(reference, candidate)
                  for k in sorted(r) if not _is_numeric(r[k])]
    if agreement:
        validation.top1_agreement = float(np.concatenate(agreement).mean())
    if metric is not None:
        validation.metric_name = metric.name
        validation.metric = metric(candidate) if finite else 0.0
        validation.metric_fp32 = metric(reference)
    return validation


def accuracy_drop(validation: Validation) -> tuple[str, float]:
    """(what was compared, drop in points): task metric, else top-1 agreement, else cosine."""
    if validation.metric is not None and validation.metric_fp32 is not None:
        return validation.metric_name or "metric", 100.0 * (validation.metric_fp32 - validation.metric)
    if validation.top1_agreement is not None:
        return "top-1 agreement", 100.0 * (1.0 - validation.top1_agreement)
    return "cosine similarity", 100.0 * (1.0 - (validation.cosine_similarity or 0.0))


def paired_latency_ms(reference: Session, candidate: Session, sample: Feeds, runs: int = 50, warmup: int = 5) -> tuple[float, float]:
    """Median latencies (reference, candidate), measured alternately so machine load hits both alike."""
    for _ in range(warmup):
        reference.run(sample)
        candidate.run(sample)
    ref_times, cand_times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        reference.run(sample)
        middle = time.perf_counter()
        candidate.run(sample)
        end = time.perf_counter()
        ref_times.append(middle - start)
        cand_times.append(end - middle)
    return statistics.median(ref_times) * 1000.0, statistics.median(cand_times) * 1000.0


# The speed gate: the most a variant's median latency may be, as a multiple of FP32's, measured
# paired on the build machine. INT8/mixed exist only to be faster, so a tie already rejects them.
# FP16 also halves the weights (the runtime policy steps down to it under memory pressure), and a
# build CPU without FP16 arithmetic runs it at FP32 speed: it is rejected only when it is slower
# beyond the run-to-run noise of a median over a few dozen sub-millisecond runs.
MAX_LATENCY_RATIO: dict[Precision, float] = {Precision.FP16: 1.25, Precision.INT8: 1.0, Precision.MIXED: 1.0}


def gate(validation: Validation, latency_ms: float | None, fp32_latency_ms: float | None, precision: Precision, *,
         max_drop: float = 1.0) -> str | None:
    """The reason to reject a variant, or None when it passes. The rule, in order:

    1. outputs with NaN/inf are rejected;
    2. accuracy: the drop in points (task metric when labels were given, else top-1 agreement
       with FP32, else cosine similarity x 100; see :func:`accuracy_drop`) must be <= ``max_drop``;
    3. speed: ``latency_ms`` must be <= ``fp32_latency_ms`` x ``MAX_LATENCY_RATIO[precision]``
       (FP16 1.25, INT8 and mixed 1.0); FP32 itself is the yardstick and is not speed-gated.
       Without both latencies there is nothing to compare and the speed check passes.
    """
    if not np.isfinite(validation.max_abs_error if validation.max_abs_error is not None else 0.0):
        return "outputs contain NaN/inf"
    what, drop = accuracy_drop(validation)
    if drop > max_drop:
        return f"{what} dropped {drop:.2f} points vs FP32 (> max_accuracy_drop {max_drop:g})"
    limit = MAX_LATENCY_RATIO.get(precision)
    if limit is not None and latency_ms is not None and fp32_latency_ms:
        if latency_ms > fp32_latency_ms * limit:
            allowed = "" if limit == 1.0 else f", {precision.value} may take up to x{limit:g}"
            return (f"slower than FP32 on the build machine ({latency_ms:.3f} ms vs {fp32_latency_ms:.3f} ms, "
                    f"x{latency_ms / fp32_latency_ms:.2f}{allowed})")
    return None


def self_test_tolerance(validation: Validation, reference: Sequence[Outputs]) -> float:
    """Max abs error a device may see on the self-test input: measured error with a margin.

    Twice the measured maximum, and never below a small fraction of the output scale, so a
    different CPU's rounding (FMA, thread split) does not fail a correct deployment.
    """
    scale = max((float(np.max(np.abs(v))) for o in reference for v in o.values() if _is_numeric(v) and v.size), default=1.0)
    return float(max(2.0 * (validation.max_abs_error or 0.0), 1e-4 * max(scale, 1.0)))


def _classes(outputs: Outputs) -> np.ndarray | None:
    first = outputs[next(iter(outputs))] if outputs else None
    if first is None or first.ndim != 2 or first.shape[1] < 2 or not _is_numeric(first):
        return None
    return first.argmax(axis=1)
