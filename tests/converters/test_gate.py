"""The gate (validate.gate) and the paired speed statistics, on fixed figures: no timing, no models."""

from __future__ import annotations

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
    verdict = gate(ACCURATE, _speed(limit + 0.03), precision)
    assert verdict.speed == SpeedVerdict.SLOWER and verdict.reason.startswith("slower than FP32 on the build machine")
    straddling = gate(ACCURATE, _speed(limit), precision)  # x1.00 against a 1.00 limit: noise, not "slower"
    assert straddling.reason is None and straddling.speed == SpeedVerdict.INCONCLUSIVE


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
    assert churned.metric_margin == pytest.approx(100 * math.sqrt((0.045 - 0.005 ** 2) / 200))
    assert judged_drop(churned) == pytest.approx(0.5 + churned.metric_margin)
    assert gate(churned, None, Precision.INT8, max_drop=1.0).reason == (
        "orientation_accuracy dropped 0.50 ±1.50 points vs FP32, 4.5% of predictions changed (> max_accuracy_drop 1)")
    steady = compare(outputs(fp32), outputs(changed(1, 1)), accuracy, classes)  # two changes that cancel
    assert steady.metric_margin == pytest.approx(100 * math.sqrt(0.01 / 200))
    assert gate(steady, None, Precision.INT8, max_drop=1.0).reason is None
    # Agreement with FP32 counts every change itself; embeddings have no classes to change: no margin.
    proxy = compare(outputs(fp32), outputs(changed(5, 4)), top1_agreement(outputs(fp32), "scores"), classes)
    assert proxy.metric_margin is None and "top-1 agreement dropped 4.50 points vs FP32 (" in gate(proxy, None, Precision.INT8).reason
    embedding = compare(outputs(fp32), outputs(changed(5, 4)), cosine(outputs(fp32), "scores"))
    assert embedding.top1_agreement is None and embedding.metric_margin is None
