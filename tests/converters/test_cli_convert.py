"""`edge-sdk convert` end to end in a real subprocess: report table/JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from edge_sdk.manifest import load_manifest
from edge_sdk.signing import generate_keypair, load_public_key


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sdk", *args], capture_output=True, text=True, timeout=300)


def test_convert_two_profiles_signed_json(cnn_path, cnn_calibration_dir, tmp_path):
    private, public = generate_keypair(tmp_path / "k.pem")
    out = tmp_path / "rel"
    result = _cli("convert", str(cnn_path), "--profile", "intel-nuc", "--profile", "generic-x86_64", "-o", str(out),
                  "--calibration", str(cnn_calibration_dir), "--target", "onnx", "--max-accuracy-drop", "20",
                  "--sign-key", str(private), "--version", "3", "--latency-runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 3 and set(report["defaults"]) == {"intel-nuc", "generic-x86_64"}
    rows = {row["id"]: row for row in report["variants"]}
    assert rows["onnx-fp32"]["size_ratio"] == 1.0 and rows["onnx-int8"]["size_ratio"] < 0.5
    manifest = load_manifest(out, load_public_key(public))
    assert {v.id for v in manifest.variants} == set(rows)


def test_convert_table_output(cnn_path, tmp_path):
    result = _cli("convert", str(cnn_path), "-p", "generic-x86_64", "-o", str(tmp_path / "rel"), "-t", "onnx",
                  "--latency-runs", "3")
    assert result.returncode == 0, result.stderr
    assert "onnx-fp32" in result.stdout and "onnx-int8" in result.stdout
    assert "release written to" in result.stdout and "default" in result.stdout


def test_bad_inputs_are_one_line_errors(cnn_path, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["convert", str(tmp_path / "missing.onnx"), "-p", "intel-nuc", "-o", str(tmp_path / "o1")], "no such file"),
        (["convert", str(corrupt), "-p", "intel-nuc", "-o", str(tmp_path / "o1")], "corrupt.onnx"),
        (["convert", str(cnn_path), "-p", "atari-2600", "-o", str(tmp_path / "o1")], "unknown device profile"),
        (["convert", str(cnn_path), "-p", "intel-nuc", "-o", str(tmp_path / "o1"), "-c", str(empty)], "empty folder"),
        (["convert", str(cnn_path), "-p", "intel-nuc", "-o", str(tmp_path / "o1"), "--prune", "channel:2"], "METHOD:AMOUNT"),
        (["convert", str(cnn_path), "-p", "intel-nuc", "-o", str(corrupt / "x")], "not writable"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o1").exists()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
