"""The benchmark gate (validate.gate) on fixed figures: no timing, no models."""

from __future__ import annotations

import pytest

from edge_sdk.converters.validate import MAX_LATENCY_RATIO, gate
from edge_sdk.manifest import Validation
from edge_sdk.types import Precision

ACCURATE = Validation(samples=16, max_abs_error=0.01, cosine_similarity=0.9999, top1_agreement=1.0)


@pytest.mark.parametrize("precision", [Precision.FP16, Precision.INT8, Precision.MIXED])
def test_a_variant_slower_than_its_limit_is_rejected(precision):
    limit = MAX_LATENCY_RATIO[precision]
    assert gate(ACCURATE, 10.0 * limit, 10.0, precision) is None  # exactly at the limit passes
    reason = gate(ACCURATE, 10.0 * limit + 0.01, 10.0, precision)
    assert reason is not None and reason.startswith("slower than FP32 on the build machine")


def test_int8_must_not_be_slower_at_all_and_fp16_gets_a_noise_margin():
    assert gate(ACCURATE, 10.5, 10.0, Precision.INT8) is not None
    assert gate(ACCURATE, 10.5, 10.0, Precision.FP16) is None
    assert "fp16 may take up to x1.25" in gate(ACCURATE, 13.0, 10.0, Precision.FP16)


def test_fp32_is_the_yardstick_and_missing_latencies_pass_the_speed_check():
    assert gate(ACCURATE, 100.0, 10.0, Precision.FP32) is None
    assert gate(ACCURATE, None, 10.0, Precision.INT8) is None
    assert gate(ACCURATE, 12.0, None, Precision.INT8) is None


def test_an_inaccurate_variant_is_rejected_even_when_fast():
    wrong = ACCURATE.model_copy(update={"top1_agreement": 0.75})
    assert gate(wrong, 1.0, 10.0, Precision.INT8, max_drop=1.0) == \
        "top-1 agreement dropped 25.00 points vs FP32 (> max_accuracy_drop 1)"
    assert gate(wrong, 1.0, 10.0, Precision.INT8, max_drop=30.0) is None


def test_the_task_metric_wins_over_agreement_and_cosine_is_the_last_resort():
    labelled = ACCURATE.model_copy(update={"metric_name": "top1_accuracy", "metric": 0.80, "metric_fp32": 0.82})
    assert "top1_accuracy dropped 2.00 points" in gate(labelled, 1.0, 10.0, Precision.INT8, max_drop=1.0)
    regression = Validation(samples=4, max_abs_error=0.5, cosine_similarity=0.95)
    assert "cosine similarity dropped 5.00 points" in gate(regression, 1.0, 10.0, Precision.FP16, max_drop=1.0)


def test_nan_outputs_are_rejected():
    assert gate(Validation(samples=1, max_abs_error=float("inf")), 1.0, 10.0, Precision.FP16) == "outputs contain NaN/inf"
