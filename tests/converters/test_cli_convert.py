"""`edge-sdk convert` end to end in a real subprocess: report table/JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_sdk import samples
from edge_sdk.manifest import load_manifest
from edge_sdk.signing import generate_keypair, load_public_key


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_convert_two_profiles_signed_json(cnn_path, cnn_calibration_dir, tmp_path):
    private, public = generate_keypair(tmp_path / "k.pem")
    out = tmp_path / "rel"
    result = _cli("convert", str(cnn_path), "--profile", "intel-nuc", "--profile", "generic-x86_64", "-o", str(out),
                  "--calibration", str(cnn_calibration_dir), "--targets", "onnx", "--max-accuracy-drop", "20",
                  "--sign-key", str(private), "--version", "3", "--latency-runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 3 and set(report["defaults"]) == {"intel-nuc", "generic-x86_64"}
    rows = {row["id"]: row for row in report["variants"]}
    assert rows["onnx-fp32"]["size_ratio"] == 1.0 and rows["onnx-int8"]["size_ratio"] < 0.5
    manifest = load_manifest(out, load_public_key(public))
    assert {v.id for v in manifest.variants} == set(rows)


def test_convert_table_output_with_profile_auto(cnn_path, tmp_path):
    from edge_sdk.profiles import detect_profile

    detected = detect_profile().profile.id
    out = tmp_path / "rel"
    # A wide console: rich wraps at 80 columns when stdout is not a terminal.
    result = _cli("convert", str(cnn_path), "-p", "auto", "-o", str(out), "-t", "onnx", "--latency-runs", "3",
                  env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    default = manifest.defaults[detected]
    assert default in {"onnx-fp32", "onnx-fp16", "onnx-int8"} and manifest.variant(default).status == "ok"
    assert manifest.variant("onnx-fp32").status == "ok"
    assert f"note: --profile auto: picked profile '{detected}': arch " in result.stdout
    assert f"profile {detected}: default {default}\n" in result.stdout
    assert "onnx-fp32" in result.stdout and "onnx-int8" in result.stdout
    assert f"release written to {out}" in result.stdout


def test_targets_take_commas_and_repeats(cnn_path, tmp_path):
    out = tmp_path / "rel"
    result = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(out), "--targets", "onnx,openvino",
                  "-t", "onnx", "--latency-runs", "2", "--max-accuracy-drop", "100", "--json")
    assert result.returncode == 0, result.stderr
    assert {v.target.value for v in load_manifest(out).variants} == {"onnx", "openvino"}
    bad = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(tmp_path / "o2"), "--targets", "onnx,coreml")
    assert bad.returncode == 1 and "unknown target 'coreml'" in bad.stderr


@pytest.mark.requires("openvino")
def test_ratios_are_against_the_fp32_reference_without_an_onnx_target(cnn_path, cnn_calibration_dir, tmp_path):
    result = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(tmp_path / "rel"), "-t", "openvino",
                  "-c", str(cnn_calibration_dir), "--latency-runs", "3", "--max-accuracy-drop", "100", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    reference = report["report"]["reference"]
    rows = {row["id"]: row for row in report["variants"]}
    assert set(rows) == {"openvino-fp32", "openvino-fp16", "openvino-int8"}
    for row in rows.values():
        assert row["size_ratio"] == pytest.approx(row["size_bytes"] / reference["size_bytes"])
        assert row["latency_ratio"] == pytest.approx(row["latency_ms"] / reference["latency_ms"])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _tensor_model(tmp_path: Path, name: str, change) -> Path:
    model = samples.make_cnn()
    change(model)
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _outside_data(model: onnx.ModelProto) -> None:
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": "../../etc/passwd", "offset": "0", "length": "64"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _opset(model: onnx.ModelProto) -> None:
    model.opset_import[0].version = 99


def _npy_folder(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    np.save(folder / "a.npy", array)
    return folder


# (case id, builder(tmp_path, cnn_path) -> argv, text the one error line must contain)
BAD_INPUTS = [
    ("missing-file", lambda t, m: ["convert", str(t / "missing.onnx"), "-p", "intel-nuc"], "no such file"),
    ("not-a-file", lambda t, m: ["convert", str(t), "-p", "intel-nuc"], "not a file"),
    ("corrupt-protobuf", lambda t, m: ["convert", str(_write(t / "corrupt.onnx", m.read_bytes()[:1000])), "-p", "intel-nuc"],
     "corrupt.onnx: not a valid ONNX file (truncated or corrupt protobuf"),
    ("plain-text", lambda t, m: ["convert", str(_write(t / "notes.txt", b"just some notes, not a model\n")), "-p", "intel-nuc"],
     "notes.txt: not a"),
    ("external-data-traversal", lambda t, m: ["convert", str(_tensor_model(t, "evil.onnx", _outside_data)), "-p", "intel-nuc"],
     "outside the model's folder; refusing to read it (path traversal)"),
    ("unsupported-opset", lambda t, m: ["convert", str(_tensor_model(t, "future.onnx", _opset)), "-p", "intel-nuc"],
     "unsupported opset 99"),
    ("dynamic-input", lambda t, m: ["convert", str(samples.save(samples.make_token_model(), t / "dyn.onnx")), "-p", "intel-nuc"],
     "input 'input_ids' has dynamic dimensions [1, 'seq']; pass --input-shape input_ids=1,N"),
    ("unknown-profile", lambda t, m: ["convert", str(m), "-p", "atari-2600"], "unknown device profile 'atari-2600'"),
    ("malformed-profile-yaml", lambda t, m: ["convert", str(m), "-p", str(_write(t / "bad.yaml", b"id: [bad\n"))],
     "bad.yaml: malformed YAML (line 2)"),
    ("calibration-empty", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "-c", str(_mkdir(t / "empty"))], "empty folder"),
    ("calibration-wrong-shape", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "-c",
                                              str(_npy_folder(t, "small", np.zeros((1, 3, 16, 16), np.float32)))],
     "input 'image' has shape [1, 3, 16, 16], the model expects"),
    ("calibration-wrong-dtype", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "-c",
                                              str(_npy_folder(t, "f64", np.zeros((1, 3, 32, 32), np.float64)))],
     "input 'image' has dtype float64, the model expects float32"),
    ("bad-prune", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--prune", "channel:2"], "METHOD:AMOUNT"),
    ("image-std-zero", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--image-std", "0.2,0,0.2"], "every value must be > 0"),
    ("image-mean-not-numbers", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--image-mean", "red"],
     "--image-mean 'red': expected comma-separated numbers"),
    ("image-layout-unknown", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--image-layout", "chw"],
     "--image-layout 'chw': expected nchw or nhwc"),
    ("constant-input-unknown", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--constant-input", "sr=16000"],
     "--constant-input sr: the model has no input 'sr' (inputs: ['image'])"),
    ("constant-input-syntax", lambda t, m: ["convert", str(m), "-p", "intel-nuc", "--constant-input", "sr"],
     "--constant-input 'sr': expected NAME=VALUE"),
]


def test_image_options_shape_the_calibration_tensors(cnn_path, tmp_path):
    from PIL import Image

    images = _mkdir(tmp_path / "images")
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    for i in range(4):
        Image.fromarray(pixels).save(images / f"red{i}.png")
    out = tmp_path / "rel"
    result = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-t", "onnx", "-c", str(images), "--image-mean", "0.5",
                  "--image-std", "0.25", "--image-bgr", "--no-speed-gate", "--latency-runs", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    image = np.load(out / "self_test" / "inputs.npz")["image"]  # the first validation sample
    np.testing.assert_allclose(image[0, 2], 2.0, atol=1e-6)  # red, now last (BGR): (1 - 0.5) / 0.25
    np.testing.assert_allclose(image[0, :2], -2.0, atol=1e-6)


@pytest.mark.parametrize("build,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_error_and_leaves_nothing(cnn_path, tmp_path, build, message):
    out = tmp_path / "out" / "rel"
    (tmp_path / "out").mkdir()
    result = _cli(*build(tmp_path, cnn_path), "-o", str(out))
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []  # neither the release nor a staging folder


def test_unwritable_output_is_one_line_error(cnn_path, tmp_path):
    a_file = _write(tmp_path / "file", b"x")
    result = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(a_file / "rel"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "not writable" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_debug_shows_the_traceback(cnn_path, tmp_path):
    result = _cli("--debug", "convert", str(tmp_path / "missing.onnx"), "-p", "intel-nuc", "-o", str(tmp_path / "rel"))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "edge_sdk.errors.ModelError:" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "rel").exists()


def test_validation_and_metric_options(cnn_path, cnn_calibration_dir, tmp_path):
    out = tmp_path / "rel"
    result = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(out), "-t", "onnx", "-c", str(cnn_calibration_dir),
                  "--validation", str(cnn_calibration_dir), "--metric", "cosine", "--latency-runs", "2",
                  "--max-accuracy-drop", "100", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["metric"] == "cosine similarity" and report["validation"]["samples"] == 16
    for bad, message in (("no_such_module:score", "--metric no_such_module:score: cannot import module 'no_such_module'"),
                         ("accuracy", "--metric 'accuracy': expected one of top1, cosine, f1 or module:function")):
        failed = _cli("convert", str(cnn_path), "-p", "intel-nuc", "-o", str(tmp_path / "bad"), "-t", "onnx",
                      "-c", str(cnn_calibration_dir), "--metric", bad, "--latency-runs", "2")
        assert failed.returncode == 1 and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr and not (tmp_path / "bad").exists()
