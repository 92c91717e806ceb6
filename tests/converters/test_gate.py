"""The gate (validate.gate) and the paired speed statistics, on fixed figures: no timing, no models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_sdk.converters.validate import MAX_LATENCY_RATIO, SpeedComparison, gate, paired_ratio
from edge_sdk.manifest import Validation
from edge_sdk.types import Precision, SpeedVerdict

ACCURATE = Validation(samples=16, max_abs_error=0.01, cosine_similarity=0.9999, top1_agreement=1.0)


def _speed(ratio: float, half_width: float = 0.02) -> SpeedComparison:
    return SpeedComparison(reference_ms=10.0, candidate_ms=10.0 * ratio, ratio=ratio, low=ratio - half_width,
                           high=ratio + half_width, pairs=100)


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8, Precision.MIXED])
def test_slower_only_when_the_whole_interval_is_above_the_limit(precision):
    limit = MAX_LATENCY_RATIO[precision]
    assert gate(ACCURATE, _speed(limit - 0.03), precision).reason is None
    assert gate(ACCURATE, _speed(limit - 0.03), precision).speed == SpeedVerdict.OK
    verdict = gate(ACCURATE, _speed(limit * 1.02 + 0.03), precision)
    assert verdict.speed == SpeedVerdict.SLOWER and verdict.reason.startswith("slower than FP32 on the build machine")
    straddling = gate(ACCURATE, _speed(limit), precision)  # x1.00 against a 1.00 limit: noise, not "slower"
    assert straddling.reason is None and straddling.speed == SpeedVerdict.INCONCLUSIVE
    drift = gate(ACCURATE, _speed(limit * 1.01, half_width=0.005), precision)  # 1% over, tight: frequency drift
    assert drift.reason is None and drift.speed == SpeedVerdict.INCONCLUSIVE


def test_int8_must_not_be_slower_and_fp16_gets_a_margin():
    assert gate(ACCURATE, _speed(1.05), Precision.INT8).speed == SpeedVerdict.SLOWER
    assert gate(ACCURATE, _speed(1.05), Precision.FP16).speed == SpeedVerdict.OK
    assert "fp16 may take up to x1.25" in gate(ACCURATE, _speed(1.3), Precision.FP16).reason


def test_fp32_is_the_yardstick_and_missing_latencies_pass_the_speed_check():
    assert gate(ACCURATE, _speed(10.0), Precision.FP32).reason is None
    assert gate(ACCURATE, None, Precision.INT8).reason is None


def test_an_inaccurate_variant_is_rejected_even_when_fast():
    wrong = ACCURATE.model_copy(update={"top1_agreement": 0.75})
    assert gate(wrong, _speed(0.1), Precision.INT8, max_drop=1.0).reason == \
        "top-1 agreement dropped 25.00 points vs FP32 (> max_accuracy_drop 1)"
    assert gate(wrong, _speed(0.1), Precision.INT8, max_drop=30.0).reason is None


def test_the_metric_wins_over_agreement_and_cosine_is_the_last_resort():
    labelled = ACCURATE.model_copy(update={"metric_name": "top1_accuracy", "metric": 0.80, "metric_fp32": 0.82})
    assert "top1_accuracy dropped 2.00 points" in gate(labelled, None, Precision.INT8, max_drop=1.0).reason
    regression = Validation(samples=4, max_abs_error=0.5, cosine_similarity=0.95)
    assert "cosine similarity dropped 5.00 points" in gate(regression, None, Precision.FP16, max_drop=1.0).reason


def test_a_drop_exactly_at_the_budget_passes_despite_float_rounding():
    one_miss = ACCURATE.model_copy(update={"metric_name": "top1_accuracy", "metric": 6 / 100, "metric_fp32": 7 / 100})
    assert gate(one_miss, None, Precision.INT8, max_drop=1.0).reason is None  # 1.0000000000000009 points
    two_misses = one_miss.model_copy(update={"metric": 5 / 100})
    assert "dropped 2.00 points" in gate(two_misses, None, Precision.INT8, max_drop=1.0).reason


def test_nan_outputs_are_rejected():
    assert gate(Validation(samples=1, max_abs_error=float("inf")), None, Precision.FP16).reason == "outputs contain NaN/inf"


def test_the_ratio_interval_covers_the_true_ratio_and_narrows_with_more_pairs():
    rng = np.random.default_rng(0)
    reference = 0.010 * (1 + 0.3 * rng.random(400))  # noisy, as on a shared machine
    candidate = 0.6 * reference * (1 + 0.1 * rng.standard_normal(400))
    small, large = paired_ratio(reference[:40], candidate[:40]), paired_ratio(reference, candidate)
    for comparison in (small, large):
        assert comparison.low <= 0.6 <= comparison.high
    assert large.high - large.low < small.high - small.low
    assert large.pairs == 400 and large.verdict(1.0) == SpeedVerdict.OK
    same = paired_ratio(reference, reference * (1 + 0.05 * rng.standard_normal(400)))
    assert same.verdict(1.0) == SpeedVerdict.INCONCLUSIVE  # identical speed never reads as slower


def test_a_task_metric_over_class_scores_is_judged_with_the_standard_error_of_changed_predictions():
    """ocr-cls INT8, measured: 9 of 200 orientations changed, one more miss than fixes (-0.5
    points on validation), and -4.3 points on the next 256 images."""
    import math

    from edge_sdk.converters.metrics import Judged, OutputKind, TaskMetric, cosine, top1_agreement
    from edge_sdk.converters.validate import compare, judged_drop

    truth = np.random.default_rng(0).integers(0, 2, 200)
    fp32 = truth.copy()
    fp32[:14] ^= 1  # FP32 is wrong on 14 of 200

    def outputs(predictions):
        return [{"scores": np.eye(2, dtype=np.float32)[[p]]} for p in predictions]

    def changed(right_to_wrong: int, wrong_to_right: int) -> np.ndarray:
        predictions = fp32.copy()
        predictions[14:14 + right_to_wrong] ^= 1
        predictions[:wrong_to_right] ^= 1
        return predictions

    accuracy = TaskMetric("orientation_accuracy", lambda outs: float(np.mean([o["scores"].argmax() for o in outs] == truth)))
    classes = Judged("scores", OutputKind.CLASS_SCORES)
    churned = compare(outputs(fp32), outputs(changed(5, 4)), accuracy, classes)
    assert churned.top1_agreement == pytest.approx(0.955)
    assert churned.metric_margin == pytest.approx(100 * math.sqrt((0.045 - 0.005 ** 2) / 200), rel=0.02)
    assert judged_drop(churned) == pytest.approx(0.5 + churned.metric_margin)
    assert gate(churned, None, Precision.INT8, max_drop=1.0).reason == (
        "orientation_accuracy dropped 0.50 ±1.51 points vs FP32, 4.5% of predictions changed (> max_accuracy_drop 1)")
    steady = compare(outputs(fp32), outputs(changed(1, 1)), accuracy, classes)  # two changes that cancel
    assert steady.metric_margin == pytest.approx(100 * math.sqrt(0.01 / 200), rel=0.02)
    assert gate(steady, None, Precision.INT8, max_drop=1.0).reason is None
    # Agreement with FP32 counts every change itself; embeddings have no classes to change: no margin.
    proxy = compare(outputs(fp32), outputs(changed(5, 4)), top1_agreement(outputs(fp32), "scores"), classes)
    assert proxy.metric_margin is None and "top-1 agreement dropped 4.50 points vs FP32 (" in gate(proxy, None, Precision.INT8).reason
    embedding = compare(outputs(fp32), outputs(changed(5, 4)), cosine(outputs(fp32), "scores"))
    assert embedding.top1_agreement is None and embedding.metric_margin is None


def _pooled_f1(outputs) -> float:
    """F1 over boxes pooled across samples (a detector's usual figure): not a mean of per-sample scores."""
    tp, fp, fn = (sum(float(o[k]) for o in outputs) for k in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _line_accuracy(outputs) -> float:
    """Characters right over characters, pooled across text lines of different lengths."""
    return sum(float(o["right"]) for o in outputs) / sum(float(o["chars"]) for o in outputs)


def _detections(rng, n: int):
    truth = rng.integers(2, 12, n)
    fp32 = [{"tp": t - m, "fp": f, "fn": m} for t, m, f in zip(truth, rng.integers(0, 2, n), rng.integers(0, 2, n))]
    candidate = []
    for o in fp32:  # a third of the images move one box either way, slightly more often for the worse
        step = rng.choice([-1, 0, 0, 1, 0, 0, -1, 0, 1]) if o["tp"] > 0 else 0
        candidate.append({"tp": o["tp"] + step, "fp": o["fp"] + (step < 0) * rng.integers(0, 2), "fn": o["fn"] - step})
    return fp32, candidate


def _lines(rng, n: int):
    chars = rng.integers(5, 40, n)
    fp32 = [{"right": c - rng.integers(0, 3), "chars": c} for c in chars]
    candidate = [{"right": o["right"] + rng.choice([-2, -1, 0, 0, 0, 0, 0, 1]), "chars": o["chars"]} for o in fp32]
    return fp32, candidate


@pytest.mark.parametrize("metric_fn, population", [(_line_accuracy, _lines), (_pooled_f1, _detections)],
                         ids=["ctc_line_accuracy", "pooled_box_f1"])
def test_the_margin_is_the_standard_error_of_the_drop_on_any_task_metric(metric_fn, population):
    """Over many validation sets of 48 samples drawn from one population, the margin each set
    reports is about the spread of the drops those sets measure, for metrics that pool over samples."""
    from edge_sdk.converters.metrics import TaskMetric
    from edge_sdk.converters.validate import compare

    rng = np.random.default_rng(1)
    fp32, candidate = population(rng, 5000)
    metric = TaskMetric(metric_fn.__name__, metric_fn)
    drops, margins = [], []
    for _ in range(300):
        draw = rng.choice(len(fp32), 48, replace=False)
        validation = compare([fp32[i] for i in draw], [candidate[i] for i in draw], metric)
        drops.append(100 * (validation.metric_fp32 - validation.metric))
        margins.append(validation.metric_margin)
    assert np.std(drops) > 0.1
    assert np.mean(margins) == pytest.approx(np.std(drops), rel=0.2)


def test_samples_whose_outputs_equal_fp32s_have_no_share_in_the_margin():
    from edge_sdk.converters.metrics import TaskMetric
    from edge_sdk.converters.validate import MARGIN_GROUPS, metric_margin

    calls = []
    fp32, candidate = _lines(np.random.default_rng(2), 400)
    counted = TaskMetric("line_accuracy", lambda outputs: calls.append(1) or _line_accuracy(outputs))
    assert metric_margin(counted, fp32, fp32) == 0.0 and not calls
    moved = [i for i, (c, r) in enumerate(zip(candidate, fp32)) if c["right"] != r["right"]][:3]
    few = [candidate[i] if i in moved else r for i, r in enumerate(fp32)]
    assert metric_margin(counted, fp32, few) > 0 and 2 <= len(calls) <= 1 + 3  # FP32's, then one per block that moved
    calls.clear()
    assert metric_margin(counted, fp32, candidate) > 0 and len(calls) <= 1 + MARGIN_GROUPS  # bounded on many samples


def test_a_sparse_change_among_many_samples_is_never_missed():
    """One changed prediction in 206 files (magika INT8, measured) is one standard error of
    about half a point, wherever it falls among the blocks."""
    from edge_sdk.converters.metrics import TaskMetric
    from edge_sdk.converters.validate import metric_margin

    truth = np.zeros(206, dtype=int)
    accuracy = TaskMetric("top1", lambda outs: float(np.mean([o["label"] for o in outs] == truth)))
    fp32 = [{"label": np.int64(0), "scores": np.float32(i)} for i in range(206)]
    for changed in (0, 101, 205):
        candidate = [{"label": np.int64(i == changed), "scores": np.float32(i + 1e-3)} for i in range(206)]
        assert metric_margin(accuracy, fp32, candidate) == pytest.approx(100 / 206, rel=0.02)
