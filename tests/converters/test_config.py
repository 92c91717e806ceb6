"""ConvertConfig: edge_sdk.convert's keywords land in typed parts; bad values fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.converters.config import OPTIONS, ConvertConfig, PruneSpec
from edge_sdk.converters.targets.base import CalibrationMethod
from edge_sdk.errors import ConfigError
from edge_sdk.profiles import detect_profile
from edge_sdk.types import Target


def test_flat_keywords_become_typed_parts():
    config = ConvertConfig.from_options(
        "m.onnx", ["intel-nuc", "intel-nuc"], "out", targets="onnx, openvino", input_shapes=["x=1,3,8,8"],
        prune="channel:0.25", calibration="random", calibration_method="entropy", per_channel=False,
        max_accuracy_drop=2, latency_runs=7, validation_limit=9, speed_gate=False, release_version=4, model_name="net")
    assert [p.id for p in config.profiles] == ["intel-nuc"]  # a profile named twice is built once
    assert config.targets == frozenset({Target.ONNX, Target.OPENVINO})
    assert config.intake.input_shapes == {"x": (1, 3, 8, 8)}
    assert config.intake.prune == PruneSpec.parse("channel:0.25") and str(config.intake.prune) == "channel:0.25"
    assert config.quantization.method is CalibrationMethod.ENTROPY and config.quantization.per_channel is False
    validation = config.validation
    assert (validation.max_accuracy_drop, validation.latency_runs, validation.limit, validation.speed_gate) == (2.0, 7, 9, False)
    assert config.release.output == Path("out") and config.release.version == 4 and config.release.model_name == "net"
    assert set(OPTIONS) >= {"calibration", "validation", "labels", "metric", "sign_key"}


def test_auto_is_resolved_once_and_explained():
    config = ConvertConfig.from_options("m.onnx", "auto")
    detection = detect_profile()
    assert config.profiles == (detection.profile,)
    assert config.notes == (f"--profile auto: {detection.explain()}",)


@pytest.mark.parametrize("options, message", [
    ({"calibraton": "x"}, r"unknown convert option\(s\) \['calibraton'\]"),
    ({"targets": ["coreml"]}, "unknown target 'coreml'"),
    ({"calibration_method": "median"}, "unknown calibration method 'median'"),
    ({"max_accuracy_drop": 101}, "max_accuracy_drop 101"),
    ({"latency_runs": 0}, "latency_runs 0"),
    ({"release_version": 0}, "release version 0"),
    ({"prune": "channel"}, "METHOD:AMOUNT"),
    ({"input_shapes": ["x=1,a"]}, "dimensions must be integers"),
    ({"labels": [0, 1]}, "labels name the calibration"),
    ({"labels": [0, 1], "metric": object(), "calibration": "random"}, "labels or a task metric, not both"),
])
def test_bad_values_name_what_is_wrong(options, message):
    with pytest.raises(ConfigError, match=message):
        ConvertConfig.from_options("m.onnx", "intel-nuc", **options)
