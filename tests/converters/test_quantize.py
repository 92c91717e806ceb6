"""Each precision mode produces a real, loadable, smaller model with bounded error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edge_sdk import samples
from edge_sdk.converters import quantize
from edge_sdk.converters.targets.base import CalibrationMethod


@pytest.fixture(scope="module")
def calib(cnn_calibration_dir) -> list[dict[str, np.ndarray]]:
    return [{"image": np.load(p)} for p in sorted(cnn_calibration_dir.glob("*.npy"))]


def _run(path: Path, samples) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, s)[0] for s in samples])


def _weight_scales(path: Path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]].shape for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8}


def test_fp16_keeps_float_io_and_halves_weights(cnn_path, tmp_path, calib):
    out = tmp_path / "fp16.onnx"
    report = quantize.to_fp16(cnn_path, out)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert report.nodes_quantized > 0
    assert out.stat().st_size < 0.6 * cnn_path.stat().st_size
    np.testing.assert_allclose(_run(out, calib), _run(cnn_path, calib), atol=5e-3)


def test_dynamic_int8_uses_integer_ops(cnn_path, tmp_path, calib):
    out = tmp_path / "dyn.onnx"
    report = quantize.quantize_dynamic_int8(cnn_path, out)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "ConvInteger" in ops and report.nodes_quantized >= 5
    ref = _run(cnn_path, calib)
    assert np.abs(_run(out, calib) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_static_qdq_per_channel_each_method(cnn_path, tmp_path, calib, method):
    out = tmp_path / f"{method.value}.onnx"
    report = quantize.quantize_static_int8(cnn_path, out, calib, method=method, per_channel=True)
    scales = _weight_scales(out)
    conv_scales = {k: v for k, v in scales.items() if "fc" not in k}
    assert conv_scales and all(len(shape) == 1 and shape[0] > 1 for shape in conv_scales.values())  # one scale per channel
    assert report.nodes_quantized >= 5 and any(method.value in n for n in report.notes)
    assert out.stat().st_size < 0.4 * cnn_path.stat().st_size
    ref, got = _run(cnn_path, calib), _run(out, calib)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99


def test_static_qdq_per_tensor_has_scalar_scales(cnn_path, tmp_path, calib):
    out = tmp_path / "pt.onnx"
    quantize.quantize_static_int8(cnn_path, out, calib, per_channel=False)
    assert all(shape == () for shape in _weight_scales(out).values())


def test_excluded_nodes_stay_float(cnn_path, tmp_path, calib):
    out = tmp_path / "mixed.onnx"
    report = quantize.quantize_static_int8(cnn_path, out, calib, nodes_to_exclude=["stem", "fc", "not-a-node"])
    assert report.nodes_kept_fp32 == ["stem", "fc"]
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    stem = next(n for n in model.graph.node if n.name == "stem")
    assert producers.get(stem.input[1]) is None or producers[stem.input[1]].op_type != "DequantizeLinear"


def test_nothing_quantized_is_noticed(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(samples.make_if_model(), str(src))
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32), "cond": np.array(i % 2 == 0)}
             for i in range(4)]
    report = quantize.quantize_static_int8(src, tmp_path / "q.onnx", feeds)
    assert report.nodes_quantized == 0
    assert any("nothing was quantized" in n for n in report.notes)
    assert any("subgraphs" in n for n in report.notes)


def test_weight_matmuls_only_and_dynamic_matmul_on_a_token_model(tmp_path):
    """The transformer recipes: integer inputs untouched, only MatMuls by weights quantized."""
    src = samples.save(samples.make_token_model(), tmp_path / "tokens.onnx")
    from edge_sdk.converters.loader import read_model

    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 64, (1, 8)).astype(np.int64), "attention_mask": np.ones((1, 8), np.int64)}
             for _ in range(8)]
    loaded = read_model(src).finish(tmp_path, {n: [f[n].shape for f in feeds] for n in feeds[0]})
    static = quantize.quantize_static_int8(loaded.path, tmp_path / "s.onnx", feeds, op_types=("Conv", "MatMul", "Gemm"),
                                           extra_options={"MatMulConstBOnly": True})
    dynamic = quantize.quantize_dynamic_int8(loaded.path, tmp_path / "d.onnx", op_types=("MatMul", "Gemm"))
    for path, report in ((tmp_path / "s.onnx", static), (tmp_path / "d.onnx", dynamic)):
        graph = onnx.load(str(path)).graph
        assert report.nodes_quantized >= 2
        assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.INT64] * 2
        reference = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
        assert float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got)) > 0.99
    assert "op types ['Conv', 'MatMul', 'Gemm']" in static.notes[-1]


def test_names_the_quantizer_adds_are_shortened_and_the_models_own_kept(cnn_path, tmp_path, calib):
    out = tmp_path / "int8.onnx"
    quantize.quantize_static_int8(cnn_path, out, calib)
    fp32, int8 = onnx.load(str(cnn_path)).graph, onnx.load(str(out)).graph
    own = {n.name for n in fp32.node} | {t for n in fp32.node for t in (*n.input, *n.output)}
    names = {n.name for n in int8.node} | {t for n in int8.node for t in (*n.input, *n.output) if t}
    short = [name for name in names - own if name.startswith("_") and name[1:].rstrip("_").isdigit()]
    assert len(short) > 20  # Q/DQ nodes, quantized weights, scales, zero points
    suffixes = ("_quantized", "QuantizeLinear", "_scale", "_zero_point")
    assert not [name for name in names if any(suffix in name for suffix in suffixes)]
    assert {n.name for n in fp32.node if n.op_type in ("Conv", "Gemm")} <= {n.name for n in int8.node}
    assert len(int8.value_info) == 0
    image = calib[0]["image"]
    plain = ort.InferenceSession(str(cnn_path), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    short = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": image})[0]
    assert short.shape == plain.shape and np.corrcoef(short.ravel(), plain.ravel())[0, 1] > 0.98
