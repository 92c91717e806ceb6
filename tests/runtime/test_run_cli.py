"""`edge-sdk run` and `edge-sdk bench` on a real release, through the real console script entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.cli import main
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.model import EdgeModel


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image_npy(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path / "x.npy", x


def test_run_prints_outputs_matching_the_api(cnn_release: Path, image_npy, capsys) -> None:
    path, x = image_npy
    code, out, err = cli(capsys, "run", str(cnn_release), "--input", f"image={path}", "--precision", "int8",
                         "--profile", "intel-nuc", "--json")
    assert code == 0, err
    summary = json.loads(out)
    with EdgeModel.load(cnn_release, profile="intel-nuc", precision="int8", monitor=False) as model:
        want = model.run({"image": x})["logits"]
    assert summary["variant"] == "onnx-int8" and summary["precision"] == "int8"
    stats = summary["outputs"]["logits"]
    assert stats["shape"] == [1, 10] and stats["argmax"] == int(want.argmax())
    assert stats["max"] == pytest.approx(float(want.max()), abs=1e-6)


def test_run_saves_npz_and_accepts_bare_npy_and_npz_inputs(cnn_release: Path, image_npy, tmp_path: Path, capsys) -> None:
    path, x = image_npy
    out_file = tmp_path / "out.npz"
    code, out, err = cli(capsys, "run", str(cnn_release), "-i", str(path), "--precision", "fp32",
                         "--profile", "intel-nuc", "--output", str(out_file))
    assert code == 0, err
    assert "onnx-fp32" in out and f"saved outputs to {out_file}" in out
    saved = np.load(out_file)["logits"]
    np.savez(tmp_path / "in.npz", image=x)
    code, out, err = cli(capsys, "run", str(cnn_release), "-i", str(tmp_path / "in.npz"), "--precision", "fp32",
                         "--profile", "intel-nuc", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"]["logits"]["max"] == pytest.approx(float(saved.max()), abs=1e-6)


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "pixels=X"], "input names \\['pixels'\\] do not match"),
    (["--input", "image=missing.npy"], "no such file"),
    (["--input", "image=X", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["--input", "image=X", "--backend", "ncnn"], "no usable variant for backend 'ncnn'"),
])
def test_run_errors_are_one_clear_line(cnn_release: Path, image_npy, capsys, args, message) -> None:
    import re

    path, _ = image_npy
    args = [a.replace("X", str(path)) for a in args]
    code, out, err = cli(capsys, "run", str(cnn_release), "--profile", "intel-nuc", *args)
    assert code == 1
    assert err.startswith("error:") and re.search(message, " ".join(err.split()))
    assert "Traceback" not in err


def test_run_refuses_a_wrong_signature(cnn_release: Path, image_npy, tmp_path: Path, capsys) -> None:
    from edge_sdk.signing import generate_keypair

    _, pub = generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    path, _ = image_npy
    code, _, err = cli(capsys, "run", str(cnn_release), "-i", f"image={path}", "--public-key", str(pub))
    assert code == 1 and "signature does not verify" in err


def test_bench_json_has_figures_per_variant(cnn_release: Path, capsys) -> None:
    code, out, err = cli(capsys, "bench", str(cnn_release), "--profile", "intel-nuc", "--runs", "20", "--warmup", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"onnx-fp32", "onnx-fp16", "onnx-int8"}
    weights_mb = {v.id: sum(f.size for f in v.files) / 2**20 for v in load_manifest(cnn_release).variants}
    for row in rows.values():
        assert row["error"] is None and row["runs"] == 20
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput_per_s"] > 0 and row["rss_mb"] >= weights_mb[row["variant"]] > 0


def test_bench_table_and_all_variants(cnn_release: Path, capsys) -> None:
    code, out, err = cli(capsys, "bench", str(cnn_release), "--profile", "intel-nuc", "--runs", "5", "--all-variants")
    assert code == 0, err
    for name in ("onnx-fp32", "onnx-fp16", "onnx-int8", "p99", "calls/s"):
        assert name in out
