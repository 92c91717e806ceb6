"""The real-model corpus through every target (issue 11): what the converter must get right on
models it was not tuned on. Each model is converted once per session (``conftest.zoo``); every
artifact is re-scored on the held-out test split through its own runtime backend.

Goals not met yet are listed in ``expected.GAPS`` and run as strict xfails: a change that meets
one turns it into a failure until its entry is deleted, so the corpus only ever ratchets up
(``expected.STRADDLING``: gaps at the budget's edge, non-strict).
"""

from __future__ import annotations

import math

import pytest

from edge_sdk.types import Precision

from . import CASES
from .conftest import TARGETS
from .expected import GAPS, STRADDLING, TESTED

QUANTIZED = (Precision.INT8, Precision.MIXED)
MAX_DROP = 1.0  # points of the task metric: issue 11's budget
# The gate decides on the validation split; re-scoring on the held-out split adds that split's own
# sampling noise (ocr-cls: one image of 256 is 0.39 points), so held-out checks of what the gate
# accepted allow this much beyond the budget.
HELD_OUT_SLACK = 0.5
SIZE_GOAL = 0.35  # × the FP32 source model


def _params(checks, ids=None):
    """(model, check) pairs, each a strict xfail when ``GAPS`` lists it."""
    params = []
    for name in TESTED:
        for check in checks:
            gap = GAPS.get((name, check))
            strict = (name, check) not in STRADDLING
            marks = [pytest.mark.xfail(strict=strict, reason=f"issue 11 gap: {gap}")] if gap else []
            params.append(pytest.param(name, check, marks=marks, id=f"{name}-{check}"))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("name,check", _params(["reasons"]))
def test_every_target_answers_with_a_variant_or_one_line_why(zoo, name, check):
    converted = zoo(name)
    planned = {(t, p) for t in TARGETS for p in ("fp32", "fp16", "int8")}
    made = {(v.target.value, v.precision.value) for v in converted.manifest.variants}
    assert planned <= made, sorted(planned - made)
    assert converted.manifest.variant("onnx-fp32").ok
    bad = {v.id: v.reason for v in converted.manifest.variants if not v.ok and not _one_line(v.reason)}
    assert not bad, bad


def _one_line(reason: str | None) -> bool:
    """The SDK's words: one line, short, no traceback or raw Python exception text."""
    return bool(reason) and "\n" not in reason and len(reason) <= 300 and not any(
        marker in reason for marker in ("Traceback", 'File "', "truth value of an array", "^^^^"))


@pytest.mark.slow
@pytest.mark.parametrize("name,check", _params(["accepted-keep-metric"]))
def test_every_accepted_variant_keeps_the_task_metric_on_held_out_data(zoo, name, check):
    """No false accepts: whatever the gate passed scores within budget on data it never saw."""
    converted = zoo(name)
    drops = {v.id: round(converted.test_drop(v), 2) for v in converted.manifest.variants if v.ok}
    assert drops["onnx-fp32"] == 0.0
    over = {v: d for v, d in drops.items() if d > MAX_DROP + HELD_OUT_SLACK}
    assert not over, (over, drops)


@pytest.mark.slow
@pytest.mark.parametrize("name,check", _params(["onnx-int8-goal"]))
def test_an_accepted_quantized_onnx_variant_meets_the_size_and_metric_goal(zoo, name, check):
    converted = zoo(name)
    candidates = [v for v in converted.manifest.variants if v.ok and v.target.value == "onnx" and v.precision in QUANTIZED]
    figures = {v.id: (round(v.size_bytes / converted.source_size, 3), round(converted.test_drop(v), 2)) for v in candidates}
    assert any(size <= SIZE_GOAL and drop <= MAX_DROP for size, drop in figures.values()), \
        (figures, {v.id: v.reason for v in converted.manifest.variants if v.target.value == "onnx"})


@pytest.mark.slow
@pytest.mark.parametrize("name,check", _params(["tflite-int8", "openvino-int8", "ncnn-int8"]))
def test_int8_is_accepted_on_every_target(zoo, name, check):
    converted = zoo(name)
    target = check.split("-")[0]
    variants = [v for v in converted.manifest.variants if v.target.value == target and v.precision in QUANTIZED]
    accepted = {v.id: round(converted.test_drop(v), 2) for v in variants if v.ok}
    assert any(drop <= MAX_DROP + HELD_OUT_SLACK for drop in accepted.values()), (accepted, {v.id: v.reason for v in variants})


def _corpus_params(targets):
    return [pytest.param(t, marks=[pytest.mark.xfail(strict=True, reason=f"issue 11 gap: {GAPS[('corpus', t)]}")]
                         if ("corpus", t) in GAPS else [], id=t) for t in targets]


@pytest.mark.slow
@pytest.mark.parametrize("target", _corpus_params(["tflite", "openvino"]))
def test_int8_is_accepted_on_four_of_five_families(zoo, target):
    """Issue 11: TFLite and OpenVINO INT8 accepted (within budget on held-out data) on 4 of 5
    families, i.e. on 80 % of the corpus's families."""
    families = {CASES[n].family.split(" (")[0] for n in TESTED}
    accepted = {CASES[n].family.split(" (")[0] for n in TESTED
                if any(v.ok and v.target.value == target and v.precision in QUANTIZED
                       and zoo(n).test_drop(v) <= MAX_DROP + HELD_OUT_SLACK for v in zoo(n).manifest.variants)}
    assert len(accepted) >= math.ceil(0.8 * len(families)), (sorted(accepted), sorted(families))
