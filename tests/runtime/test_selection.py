"""Variant selection from a manifest and a device profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError
from edge_sdk.manifest import load_manifest
from edge_sdk.profiles import get_profile
from edge_sdk.runtime.selection import plan_variants
from edge_sdk.types import Precision, Target


def with_extra_targets(manifest):
    """The CNN release plus a TFLite and an OpenVINO copy of each variant (same files)."""
    extra = []
    for variant in manifest.variants:
        for target, backend in ((Target.TFLITE, "tflite"), (Target.OPENVINO, "openvino")):
            extra.append(variant.model_copy(update={"id": f"{target.value}-{variant.precision.value}", "target": target,
                                                    "backend": backend}))
    return manifest.model_copy(update={"variants": manifest.variants + extra})


def test_targets_follow_the_profile_preference(cnn_release: Path) -> None:
    manifest = with_extra_targets(load_manifest(cnn_release))
    plan = plan_variants(manifest, get_profile("intel-nuc"))  # targets: openvino, onnx, tflite
    assert plan.precisions == [Precision.FP32, Precision.FP16, Precision.INT8]
    assert [v.id for v in plan.candidates[Precision.FP16]] == ["openvino-fp16", "onnx-fp16", "tflite-fp16"]
    only = plan_variants(manifest, get_profile("intel-nuc"), backend="tflite")
    assert [v.id for vs in only.candidates.values() for v in vs] == ["tflite-fp32", "tflite-fp16", "tflite-int8"]


def test_detected_profile_falls_back_to_same_arch_variants(cnn_release: Path) -> None:
    manifest = load_manifest(cnn_release)  # built for intel-nuc only
    with pytest.raises(ConfigError, match="no variant for device profile 'generic-x86_64'"):
        plan_variants(manifest, get_profile("generic-x86_64"))
    plan = plan_variants(manifest, get_profile("generic-x86_64"), detected=True)
    assert plan.precisions and "detected profile generic-x86_64" in plan.note
    with pytest.raises(ConfigError, match="no variant for device profile 'raspberry-pi-4'.*built for: intel-nuc"):
        plan_variants(manifest, get_profile("raspberry-pi-4"), detected=True)  # x86 builds are no sibling


def test_profile_precisions_limit_the_ladder(cnn_release: Path) -> None:
    manifest = load_manifest(cnn_release)
    profile = get_profile("intel-nuc").model_copy(update={"precisions": [Precision.FP32, Precision.INT8]})
    assert plan_variants(manifest, profile).precisions == [Precision.FP32, Precision.INT8]


def test_all_rejected_names_the_reasons(cnn_release: Path) -> None:
    manifest = load_manifest(cnn_release)
    rejected = manifest.model_copy(update={"variants": [v.model_copy(update={"status": "rejected", "reason": f"bad {v.id}"})
                                                        for v in manifest.variants]})
    with pytest.raises(ConfigError, match="every variant .* was rejected.*bad onnx-fp32"):
        plan_variants(rejected, get_profile("intel-nuc"))
