"""Validation of a variant against the FP32 ONNX original, and the gate.

Every artifact is run through its own runtime backend on validation inputs the calibration did
not see and compared with the FP32 outputs: max/mean absolute error, cosine similarity, top-1
agreement (first output, when it holds class scores) and the accuracy measure of
``converters/metrics.py`` (the task metric, ``--metric``, or the default for the output's kind).
A task metric against the truth nets out what a variant changed (new errors against fixed ones),
so its drop is judged with one standard error of that net added (``Validation.metric_margin``,
:func:`metric_margin`).

Speed is measured paired: FP32 and the candidate run alternately (in ABBA order, so warm-up and
frequency drift hit both alike) on the same input, and the verdict rests on the median of the
per-pair latency ratios with a distribution-free 95% confidence interval (order statistics of the
binomial sign test). More rounds are measured while the interval straddles the limit. :func:`gate`
states the rule.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..manifest import Validation
from ..runtime.backends.base import Session
# The paired speed statistics live with the runtime: devices judge their own variants with them.
from ..runtime.bench import MAX_LATENCY_RATIO, SpeedComparison, compare_speed, paired_ratio
from ..types import Precision, SpeedVerdict
from .metrics import Judged, Outputs, TaskMetric, top1_accuracy
from .targets.base import Feeds

__all__ = ["TaskMetric", "top1_accuracy", "run_all", "compare", "accuracy_drop", "judged_drop", "compare_speed", "gate",
           "MAX_LATENCY_RATIO", "SpeedComparison", "paired_ratio"]


def run_all(session: Session, samples: Sequence[Feeds], state: Mapping[str, str] | None = None) -> list[Outputs]:
    """Each sample's outputs. With ``state`` (input -> the output that feeds it next step) the
    samples are consecutive steps and each step gets the state the session itself returned at the
    step before, as a device streams a recurrent model, so state drift counts; a sample whose state
    is all zeros starts a new stream (the usual initial state) and keeps its own."""
    outputs: list[Outputs] = []
    for sample in samples:
        feeds = dict(sample)
        if outputs and state:
            for name, output in state.items():
                if np.any(sample[name]):
                    feeds[name] = outputs[-1][output]
        outputs.append(session.run(feeds))
    return outputs


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


def _numeric(outputs: Outputs) -> np.ndarray:
    return np.concatenate([outputs[k].ravel().astype(np.float64) for k in sorted(outputs) if _is_numeric(outputs[k])]
                          or [np.empty(0)])


def _is_numeric(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind in "biuf"


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs], metric: TaskMetric | None = None,
            classes: Judged | None = None) -> Validation:
    """Error figures of ``candidate`` against ``reference`` (same samples, same order). Top-1
    agreement is over the class scores ``classes`` names (argmax along its axis), if any. Outputs
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
    if classes is not None:
        top = [(np.asarray(r[classes.output]).argmax(axis=classes.axis), np.asarray(c[classes.output]).argmax(axis=classes.axis))
               for r, c in zip(reference, candidate)]
        agreement.append(np.concatenate([(a == b).ravel() for a, b in top]))
    agreement += [np.asarray(r[k]).ravel() == np.asarray(c[k]).ravel() for r, c in zip(reference, candidate)
                  for k in sorted(r) if not _is_numeric(r[k])]
    if agreement:
        validation.top1_agreement = float(np.concatenate(agreement).mean())
    if metric is not None:
        validation.metric_name = metric.name
        validation.metric = metric(candidate) if finite else 0.0
        validation.metric_fp32 = metric(reference)
        if not metric.against_fp32 and finite:
            validation.metric_margin = metric_margin(metric, reference, candidate)
    return validation


MARGIN_GROUPS = 64  # blocks of samples whose shares are measured: bounds the metric calls on large validation sets


def metric_margin(metric: TaskMetric, reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    """One standard error (points) of a task metric's drop, from each block of samples' share of it.

    A task metric nets out what a variant changed: new errors against fixed ones. A variant that
    changes 5% of 200 class predictions can score 0.5 points below FP32 on validation and 4 points
    below on the next 256 samples (ocr-cls INT8, measured). The samples are dealt into ``k``
    blocks (at most ``MARGIN_GROUPS``; sample ``i`` to block ``i % k``, so a run of similar
    samples, as in a folder sorted by class, is spread over blocks rather than counted as one).
    Block ``g``'s share ``c_g`` is the metric of FP32's outputs with that block's replaced by the
    candidate's, less FP32's metric. The drop is about the sum of the shares, so its standard
    error is ``sqrt(k / (k - 1) * sum((c_g - mean(c))**2))`` (batch means). This holds for any
    metric (accuracy, F1 pooled over boxes, line accuracy), not only class scores; for top-1
    accuracy with one sample a block it is ``sqrt((changed - net**2) / n)``. A block whose
    outputs all equal FP32's has no share and costs no metric call."""
    k = min(len(reference), MARGIN_GROUPS)
    if k < 2:
        return 0.0
    base, shares = None, np.zeros(k)
    for g in range(k):
        block = range(g, len(reference), k)
        if all(_same_outputs(reference[i], candidate[i]) for i in block):
            continue
        base = metric(reference) if base is None else base
        swapped = list(reference)
        for i in block:
            swapped[i] = candidate[i]
        shares[g] = metric(swapped) - base
    return round(100.0 * math.sqrt(k / (k - 1) * float(np.sum((shares - shares.mean()) ** 2))), 9)


def _same_outputs(reference: Outputs, candidate: Outputs) -> bool:
    return all(np.array_equal(np.asarray(reference[k]), np.asarray(candidate.get(k))) for k in reference)


def accuracy_drop(validation: Validation) -> tuple[str, float]:
    """(what was compared, drop in points): the metric, else top-1 agreement, else cosine.
    Rounded to 1e-9 points: one miss in 100 samples can come out as 100 * (7/100 - 6/100) =
    1.0000000000000009 points, which is within a budget of 1, not over it."""
    if validation.metric is not None and validation.metric_fp32 is not None:
        what, drop = validation.metric_name or "metric", 100.0 * (validation.metric_fp32 - validation.metric)
    elif validation.top1_agreement is not None:
        what, drop = "top-1 agreement", 100.0 * (1.0 - validation.top1_agreement)
    else:
        what, drop = "cosine similarity", 100.0 * (1.0 - (validation.cosine_similarity or 0.0))
    return what, round(drop, 9)


def judged_drop(validation: Validation) -> float:
    """The drop the gate holds against the budget: :func:`accuracy_drop` plus the metric's margin
    (``Validation.metric_margin``: a task metric against the truth can net changed outputs out)."""
    return round(accuracy_drop(validation)[1] + (validation.metric_margin or 0.0), 9)


def accuracy_miss(validation: Validation) -> str:
    """What the gate says of a drop: "top1 dropped 1.00 ±1.22 points vs FP32, 3.0% of predictions changed"."""
    what, drop = accuracy_drop(validation)
    if not validation.metric_margin:
        return f"{what} dropped {drop:.2f} points vs FP32"
    miss = f"{what} dropped {drop:.2f} ±{validation.metric_margin:.2f} points vs FP32"
    if validation.top1_agreement is None:
        return miss
    return f"{miss}, {100.0 * (1.0 - validation.top1_agreement):.1f}% of predictions changed"


@dataclass(frozen=True)
class GateVerdict:
    reason: str | None  # why the variant is rejected; None: it passes
    speed: SpeedVerdict | None = None


def gate(validation: Validation, speed: SpeedComparison | None, precision: Precision, *, max_drop: float = 1.0) -> GateVerdict:
    """Whether a variant passes. The rule, in order:

    1. outputs with NaN/inf are rejected;
    2. accuracy: the drop in points (see :func:`accuracy_drop`), plus one standard error when a
       task metric against the truth can net changed outputs out (:func:`metric_margin`), must be
       <= ``max_drop``;
    3. speed: with ``limit = MAX_LATENCY_RATIO[precision]`` (FP16 1.25, INT8 and mixed 1.0; FP32
       is the yardstick), the variant is rejected as slower only when the whole 95% interval of
       its latency ratio is above ``limit`` by more than ``SPEED_EQUIVALENCE`` (2%: a difference
       no user can act on, and the size of a build machine's frequency drift); when the interval
       straddles it the variant passes, marked inconclusive (never a default). Without a measurement the speed check passes.
    """
    if not np.isfinite(validation.max_abs_error if validation.max_abs_error is not None else 0.0):
        return GateVerdict("outputs contain NaN/inf")
    if judged_drop(validation) > max_drop:
        return GateVerdict(f"{accuracy_miss(validation)} (> max_accuracy_drop {max_drop:g})")
    limit = MAX_LATENCY_RATIO.get(precision)
    if limit is None or speed is None:
        return GateVerdict(None)
    verdict = speed.verdict(limit)
    if verdict == SpeedVerdict.SLOWER:
        allowed = "" if limit == 1.0 else f", {precision.value} may take up to x{limit:g}"
        return GateVerdict(f"slower than FP32 on the build machine (x{speed.ratio:.2f}, 95% CI x{speed.low:.2f}-x{speed.high:.2f}; "
                           f"{speed.candidate_ms:.3f} ms vs {speed.reference_ms:.3f} ms{allowed})", verdict)
    return GateVerdict(None, verdict)


def self_test_tolerance(validation: Validation, reference: Sequence[Outputs]) -> float:
    """Max abs error a device may see on the self-test input: measured error with a margin.

    Twice the measured maximum, and never below a small fraction of the output scale, so a
    different CPU's rounding (FMA, thread split) does not fail a correct deployment.
    """
    scale = max((float(np.max(np.abs(v))) for o in reference for v in o.values() if _is_numeric(v) and v.size), default=1.0)
    return float(max(2.0 * (validation.max_abs_error or 0.0), 1e-4 * max(scale, 1.0)))
