"""Issue 3's "done when": one `edge-sdk convert` for three profiles emits TFLite, OpenVINO, NCNN and
ONNX variants in one release, each validated by running it in its own runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from needs import need_toolchain, not_applicable

import edge_sdk
from edge_sdk.converters.targets import tflite
from edge_sdk.manifest import load_manifest, verify_file
from edge_sdk.profiles import get_profile
from edge_sdk.types import Precision, Target

pytestmark = [pytest.mark.toolchain, pytest.mark.requires("ai_edge_litert", "ncnn", "openvino")]

PROFILES = ("raspberry-pi-4", "intel-nuc", "rk3588")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def release(cnn_path, cnn_calibration_dir, tmp_path_factory):
    need_toolchain("tflite")
    need_toolchain("ncnn")
    out = tmp_path_factory.mktemp("targets") / "release"
    profile_args = [arg for p in PROFILES for arg in ("--profile", p)]
    result = _cli("convert", str(cnn_path), *profile_args, "-o", str(out), "--calibration", str(cnn_calibration_dir),
                  "--max-accuracy-drop", "20", "--latency-runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_every_target_is_in_one_manifest_and_validated_by_running_it(release, assert_release_lists_every_file):
    out, report = release
    manifest = load_manifest(out)
    by_id = {v.id: v for v in manifest.variants}
    for target in Target:
        fp32 = by_id[f"{target.value}-fp32"]
        assert fp32.ok, (fp32.id, fp32.reason)
    for variant in manifest.variants:
        if variant.files:  # built: run in its own backend on the 8 of 16 samples held out of calibration, and timed
            assert variant.backend == {"onnx": "onnxruntime"}.get(variant.target.value, variant.target.value)
            assert variant.validation.samples == 8 and variant.validation.max_abs_error is not None
            assert variant.validation.cosine_similarity > 0.9 and variant.latency_ms > 0, variant.id
            for entry in variant.files:
                verify_file(out, entry)
        else:
            assert variant.status == "rejected" and variant.reason, variant.id
    # Profiles share variants: onnx-fp32 serves all three, openvino only the NUC.
    assert by_id["onnx-fp32"].profiles == list(PROFILES)
    assert by_id["openvino-fp32"].profiles == ["intel-nuc"]
    assert by_id["tflite-fp32"].profiles == ["raspberry-pi-4", "intel-nuc", "rk3588"]
    assert by_id["ncnn-fp32"].profiles == ["raspberry-pi-4", "rk3588"]
    # NHWC is recorded for the runtime; NCNN keeps NCHW under pnnx's blob names.
    assert by_id["tflite-fp32"].inputs[0].transpose == [0, 2, 3, 1]
    assert by_id["ncnn-fp32"].inputs[0].artifact_name == "in0"
    assert_release_lists_every_file(out)
    rows = {row["id"]: row for row in report["variants"]}
    assert set(rows) == set(by_id) and rows["onnx-fp32"]["size_ratio"] == 1.0


def test_each_profile_defaults_to_its_preferred_target(release):
    out, _ = release
    manifest = load_manifest(out)
    assert set(manifest.defaults) == set(PROFILES)
    for profile_id in PROFILES:
        default = manifest.variant(manifest.defaults[profile_id])
        assert default.ok and default.target is get_profile(profile_id).targets[0], (profile_id, default.id)


def test_ncnn_int8_is_built_and_validated(release):
    variant = load_manifest(release[0]).variant("ncnn-int8")
    assert variant.files and variant.validation.nodes_quantized == 6  # 5 Convolution + 1 InnerProduct
    fp32 = load_manifest(release[0]).variant("ncnn-fp32")
    assert variant.size_bytes < 0.35 * fp32.size_bytes


def test_missing_toolchains_are_rejected_rows_and_onnx_still_completes(cnn_path, tmp_path, assert_release_lists_every_file):
    out = tmp_path / "release"
    result = _cli("convert", str(cnn_path), "-p", "raspberry-pi-4", "-o", str(out), "--targets", "onnx,tflite",
                  "-t", "ncnn", "--latency-runs", "3", "--max-accuracy-drop", "100", "--json",
                  env={"EDGE_SDK_TOOLCHAINS": str(tmp_path / "no-toolchains")})
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    for target in ("tflite", "ncnn"):
        for precision in ("fp32", "fp16", "int8"):
            variant = manifest.variant(f"{target}-{precision}")
            assert variant.status == "rejected" and not variant.files
            assert variant.reason.startswith(f"target unavailable: toolchain '{target}'")
            assert f"run `edge-sdk toolchain install {target}`" in variant.reason
    assert manifest.variant("onnx-fp32").ok and manifest.defaults["raspberry-pi-4"].startswith("onnx-")
    assert_release_lists_every_file(out)


def test_a_converter_timeout_is_a_rejected_row(cnn_path, tmp_path, monkeypatch):
    need_toolchain("tflite")
    monkeypatch.setattr(tflite, "TIMEOUT_S", 1.0)  # onnx2tf needs far longer just to import TensorFlow
    manifest = edge_sdk.convert(cnn_path, ["raspberry-pi-4"], tmp_path / "release", targets=["tflite", "onnx"],
                                latency_runs=3, max_accuracy_drop=100)
    for precision in (Precision.FP32, Precision.FP16, Precision.INT8):
        variant = manifest.variant(f"tflite-{precision.value}")
        assert variant.status == "rejected" and not variant.files
        assert variant.reason.startswith("export failed: `onnx2tf -i model.onnx -o") and "timed out after 1s" in variant.reason
    assert manifest.variant("onnx-fp32").ok
    assert not (tmp_path / "release" / "tflite").exists()
