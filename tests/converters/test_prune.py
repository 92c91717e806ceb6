"""Pruning: magnitude zeroes weights; channel pruning really removes channels and keeps outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edge_sdk import samples
from edge_sdk.converters.loader import load_model
from edge_sdk.converters.prune import PRUNERS, PruneConfig, Scope, count_flops, count_params, prune_model
from edge_sdk.errors import ConfigError

DEAD = {"stem": ("down", 16), "block_a": ("block_b", 32), "head_conv": ("fc", 64)}  # conv -> (consumer, channels)


def _with_dead_channels() -> onnx.ModelProto:
    """The sample CNN where half the channels of three prunable convs are tiny and unused downstream.

    Channel pruning by L1 norm must remove exactly those, so outputs stay the same.
    """
    model = samples.make_cnn()
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(3)

    def update(name, fn):
        array = numpy_helper.to_array(inits[name]).copy()
        inits[name].CopyFrom(numpy_helper.from_array(fn(array).astype(np.float32), name))

    for conv, (consumer, channels) in DEAD.items():
        dead = np.sort(rng.choice(channels, channels // 2, replace=False))

        def shrink(w, dead=dead):
            w[dead] *= 1e-3
            return w

        def unused(w, dead=dead, fc=consumer == "fc"):
            w[:, dead] = 0.0  # conv weights [out, in, kh, kw] and fc (transB) [classes, features]: axis 1
            return w

        update(f"{conv}.weight", shrink)
        update(f"{consumer}.weight", unused)
    return model


def _outputs(path: Path, feeds: list[dict]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


@pytest.fixture
def feeds():
    rng = np.random.default_rng(0)
    return [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]


def test_registry():
    assert {"magnitude", "channel"} <= set(PRUNERS.names())
    with pytest.raises(ConfigError, match="unknown pruning method 'nope'"):
        PRUNERS.get("nope")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        PruneConfig(amount=1.5)


def test_channel_pruning_removes_dead_channels_and_keeps_outputs(tmp_path, feeds):
    source = samples.save(_with_dead_channels(), tmp_path / "dead.onnx")
    loaded = load_model(source, tmp_path)
    pruned, report = prune_model(loaded, "channel", PruneConfig(amount=0.5), tmp_path)
    assert set(report.pruned) == set(DEAD)
    assert set(report.skipped) == {"down", "block_b"} and all("Add" in why for why in report.skipped.values())
    model = onnx.load(str(pruned.path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["stem.weight"][0] == 8 and shapes["down.weight"][1] == 8
    assert shapes["block_a.weight"][0] == 16 and shapes["block_b.weight"][1] == 16
    assert shapes["head_conv.weight"][0] == 32 and shapes["fc.weight"] == (10, 32)
    assert report.params_after < 0.6 * report.params_before
    assert report.flops_after < 0.6 * report.flops_before
    assert report.size_after < 0.6 * report.size_before
    np.testing.assert_allclose(_outputs(pruned.path, feeds), _outputs(source, feeds), atol=1e-3, rtol=1e-3)


def test_channel_pruning_of_a_plain_model_runs_and_shrinks(cnn_path, tmp_path, feeds):
    loaded = load_model(cnn_path, tmp_path)
    pruned, report = prune_model(loaded, "channel", PruneConfig(amount=0.25), tmp_path)
    model = onnx.load(str(pruned.path))
    assert count_params(model)[0] == report.params_after < report.params_before
    assert count_flops(model) == report.flops_after < report.flops_before
    assert _outputs(pruned.path, feeds).shape == (8, 10)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_magnitude_pruning_zeroes_the_requested_fraction(cnn_path, tmp_path, feeds, scope):
    loaded = load_model(cnn_path, tmp_path)
    pruned, report = prune_model(loaded, "magnitude", PruneConfig(amount=0.4, scope=Scope(scope)), tmp_path)
    model = onnx.load(str(pruned.path))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".weight") and t.dims[0] > 0]
    weights = [w for w in weights if w.ndim in (2, 4)]
    zero_fraction = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zero_fraction == pytest.approx(0.4, abs=0.01)
    if scope == "per-layer":
        assert all((w == 0).mean() == pytest.approx(0.4, abs=0.02) for w in weights)
    assert report.nonzero_after < 0.7 * report.nonzero_before
    ref, got = _outputs(cnn_path, feeds), _outputs(pruned.path, feeds)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert 0.8 < cosine < 1.0  # changed, but not destroyed


def test_pipeline_with_channel_pruning(tmp_path, cnn_calibration_dir):
    import edge_sdk

    source = samples.save(_with_dead_channels(), tmp_path / "dead.onnx")
    manifest = edge_sdk.convert(source, ["generic-x86_64"], tmp_path / "release", calibration=cnn_calibration_dir,
                                targets=["onnx"], prune="channel:0.5", max_accuracy_drop=20, latency_runs=5)
    fp32 = manifest.variant("onnx-fp32")
    assert fp32.ok and fp32.validation.top1_agreement == 1.0
    assert fp32.size_bytes < 0.6 * source.stat().st_size
    assert manifest.report.prune.params_after < manifest.report.prune.params_before
    with pytest.raises(ConfigError, match="METHOD:AMOUNT"):
        edge_sdk.convert(source, ["generic-x86_64"], tmp_path / "r2", prune="channel")
    assert not (tmp_path / "r2").exists()
