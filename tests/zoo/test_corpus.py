"""The corpus itself: every model runs on its data and really does its task in FP32, and the
splits are disjoint and reproducible. Cheap (onnxruntime FP32 only), so it covers every case,
including those only ``benchmarks/zoo.py`` converts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from . import CASES
from .conftest import require_data
from .measure import onnx_session

# The FP32 source model's task metric on the test split is at least this (measured a little above).
FP32_FLOOR = {"centerface": 0.95, "magika": 0.85, "ocr-det": 0.75, "ocr-rec": 0.90, "ocr-cls": 0.90,
              "silero-vad": 0.93, "minilm": 0.65}


def _digests(feeds) -> set[str]:
    return {hashlib.sha256(b"".join(np.ascontiguousarray(f[k]).tobytes() for k in sorted(f))).hexdigest() for f in feeds}


@pytest.mark.parametrize("name", list(CASES))
def test_the_fp32_model_does_its_task_on_held_out_data(name):
    case = CASES[name]
    require_data(case)
    data = case.data()
    score = case.evaluate(onnx_session(case.static_model()), data.test)
    assert FP32_FLOOR[name] <= score <= 1.0, (case.metric_name, score)
    assert len(data.calibration) >= 8 and len(data.validation.feeds) >= 8 and len(data.test.feeds) >= 8


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_validation_and_test_never_share_a_sample(name):
    case = CASES[name]
    require_data(case)
    data = case.data()
    calibration, validation, test = (_digests(s) for s in (data.calibration, data.validation.feeds, data.test.feeds))
    assert not calibration & validation and not calibration & test and not validation & test


@pytest.mark.parametrize("name", ["magika", "ocr-cls"])
def test_preparing_the_data_again_gives_the_same_bytes(name):
    case = CASES[name]
    require_data(case)
    cached, fresh = case.data(), case.prepare()
    for split in ("calibration", "validation", "test"):
        a, b = getattr(cached, split), getattr(fresh, split)
        feeds_a, feeds_b = (a, b) if split == "calibration" else (a.feeds, b.feeds)
        assert [_digests([f]) for f in feeds_a] == [_digests([f]) for f in feeds_b], split
