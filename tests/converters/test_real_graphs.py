"""What real graphs contain, through the whole pipeline: integer inputs, symbolic dims fixed from the
samples, embeddings judged by cosine, held-out validation, and bad data that names itself."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edge_sdk
from edge_sdk import samples
from edge_sdk.errors import ConfigError
from edge_sdk.manifest import load_manifest
from edge_sdk.types import Precision


def _token_samples(folder, count: int, seq: int = 12, dtype=np.int64, seed: int = 1):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        mask = np.ones((1, seq), np.int64)
        mask[0, rng.integers(seq // 2, seq):] = 0
        np.savez(folder / f"s{i:02d}.npz", input_ids=rng.integers(0, 64, (1, seq)).astype(dtype), attention_mask=mask)
    return folder


@pytest.fixture(scope="module")
def token_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    model = samples.save(samples.make_token_model(), root / "encoder.onnx")
    out = root / "release"
    manifest = edge_sdk.convert(model, ["intel-nuc"], out, calibration=_token_samples(root / "calib", 24),
                                targets=["onnx"], latency_runs=10)
    return out, manifest


def test_integer_inputs_pass_through_unchanged_and_are_never_quantized(token_release):
    out, manifest = token_release
    assert any("dynamic dims ['seq'] fixed to [12], the size every sample has" in n for n in manifest.report.notes)
    for variant in manifest.variants:
        assert [(s.name, s.dtype, s.shape) for s in variant.inputs] == [("input_ids", "int64", [1, 12]),
                                                                       ("attention_mask", "int64", [1, 12])]
    int8 = manifest.variant("onnx-int8")
    assert int8.validation.nodes_quantized > 0 and int8.files
    graph = onnx.load(str(out / int8.files[0].path)).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64] * 2
    quantized_inputs = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for i in n.input}
    assert not quantized_inputs & {"input_ids", "attention_mask"}
    self_test = np.load(out / manifest.self_test.inputs.path)
    assert self_test["input_ids"].dtype == np.int64


def test_an_embedding_is_judged_by_cosine_on_held_out_samples(token_release):
    _, manifest = token_release
    assert manifest.report.metric == "cosine similarity"
    assert manifest.report.calibration.samples + manifest.report.validation.samples == 24
    assert manifest.report.validation.samples == 8 and "held out" in manifest.report.validation.source
    for variant in manifest.variants:
        assert variant.validation.metric_name == "cosine similarity" and variant.validation.recipe
    tried = {a.recipe: a.outcome for a in manifest.report.recipes["onnx-int8"]}
    assert tried["dynamic-matmul"] != "skipped"  # a MatMul graph: dynamic INT8 competes with static QDQ
    assert tried["dynamic"] == "skipped"


def test_calibration_of_the_wrong_dtype_for_an_integer_input_names_the_file(tmp_path):
    model = samples.save(samples.make_token_model(), tmp_path / "encoder.onnx")
    folder = _token_samples(tmp_path / "calib", 4, dtype=np.float32)
    with pytest.raises(ConfigError, match=r"s00.npz: input 'input_ids' has dtype float32, the model expects int64"):
        edge_sdk.convert(model, ["intel-nuc"], tmp_path / "rel", calibration=folder, targets=["onnx"])
    assert not (tmp_path / "rel").exists()


def test_a_small_validation_folder_is_a_warning_and_validation_never_overlaps_calibration(cnn_path, cnn_calibration_dir,
                                                                                        tmp_path):
    held_out = tmp_path / "validation"
    held_out.mkdir()
    for path in sorted(cnn_calibration_dir.glob("*.npy"))[:5]:
        np.save(held_out / f"v_{path.name}", np.load(path) + 0.01)
    manifest = edge_sdk.convert(cnn_path, ["intel-nuc"], tmp_path / "rel", calibration=cnn_calibration_dir,
                                validation=held_out, targets=["onnx"], latency_runs=3, max_accuracy_drop=100,
                                mixed_precision=False)
    assert manifest.report.validation.samples == 5 and manifest.report.calibration.samples == 16
    assert any("validation has only 5 samples (fewer than 8)" in w for w in manifest.report.warnings)
    assert load_manifest(tmp_path / "rel").variant("onnx-fp32").validation.samples == 5


def _saved(graph, path):
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _weights_inside_an_if(path):
    """x [1, 16] -> If(flag): then x @ W1 @ W2 -> Relu -> @ W3, else x @ W1; every weight a Constant
    node inside the bodies (as exporters write them: silero-vad). W1 has one outlier, so x @ W1 has
    one huge column, and INT8 of that activation (the input of the second MatMul, quantized per
    tensor at run time) rounds the other columns to 0; W2 ignores the huge column, so the output
    is made of the lost ones alone (on any CPU, with or without VNNI). W3 quantizes well."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 1, (16, 16)).astype(np.float32)
    w1[0, 0] = 2000.0
    w2 = rng.normal(0, 0.25, (16, 2048)).astype(np.float32)
    w2[0] = 0.0
    weights = {"w1": w1, "w2": w2, "w3": rng.normal(0, 0.02, (2048, 16)).astype(np.float32)}

    def constants(prefix, names):
        return [onnx.helper.make_node("Constant", [], [f"{prefix}_{n}"], name=f"{prefix}_const_{n}",
                                      value=onnx.numpy_helper.from_array(weights[n], f"{prefix}_{n}")) for n in names]

    then = onnx.helper.make_graph(
        constants("t", ["w1", "w2", "w3"]) + [
            onnx.helper.make_node("MatMul", ["x", "t_w1"], ["t_h1"], name="t_mm1"),
            onnx.helper.make_node("MatMul", ["t_h1", "t_w2"], ["t_h2"], name="t_mm2"),
            onnx.helper.make_node("Relu", ["t_h2"], ["t_r"], name="t_relu"),
            onnx.helper.make_node("MatMul", ["t_r", "t_w3"], ["t_y"], name="t_mm3")], "then", [],
        [onnx.helper.make_tensor_value_info("t_y", onnx.TensorProto.FLOAT, [1, 16])])
    other = onnx.helper.make_graph(constants("e", ["w1"]) + [onnx.helper.make_node("MatMul", ["x", "e_w1"], ["e_y"], name="e_mm1")],
                                   "else", [], [onnx.helper.make_tensor_value_info("e_y", onnx.TensorProto.FLOAT, [1, 16])])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then, else_branch=other)], "inside-if",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16]),
         onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])])
    return _saved(graph, path)


def test_weights_inside_subgraphs_are_quantized_and_the_one_that_breaks_is_kept_fp32(tmp_path):
    model = _weights_inside_an_if(tmp_path / "inside-if.onnx")
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.normal(0, 1, (1, 16)).astype(np.float32), "flag": np.array(True)} for _ in range(48)]
    manifest = edge_sdk.convert(model, ["intel-nuc"], tmp_path / "rel", calibration=feeds, targets=["onnx"],
                                metric="cosine", latency_runs=3, speed_gate=False)
    assert any("Constant nodes inside subgraphs made initializers" in n for n in manifest.report.notes)
    int8 = manifest.variant("onnx-int8")
    assert not int8.ok and "dynamic-matmul: cosine similarity dropped" in int8.reason, int8.reason  # W1 breaks INT8
    mixed = manifest.variant("onnx-mixed")
    assert mixed.ok and mixed.validation.nodes_kept_fp32 == ["t_mm2"], (mixed.reason, mixed.validation)
    assert mixed.validation.cosine_similarity > 0.99
    assert mixed.size_bytes < 0.7 * manifest.variant("onnx-fp32").size_bytes


def _leaky_integrator(path):
    """h' = 0.9 h + x (a recurrent state, [1, 4]); outputs y = h' and the state."""
    decay = onnx.numpy_helper.from_array(np.full((1, 4), 0.9, np.float32), "decay")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["h", "decay"], ["kept"], name="keep"),
         onnx.helper.make_node("Add", ["kept", "x"], ["hN"], name="add"),
         onnx.helper.make_node("Identity", ["hN"], ["y"], name="out")], "integrator",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
         onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4]),
         onnx.helper.make_tensor_value_info("hN", onnx.TensorProto.FLOAT, [1, 4])], [decay])
    return _saved(graph, path)


def test_a_recurrent_state_is_validated_streaming_each_variant_carrying_its_own(tmp_path):
    from edge_sdk.converters.loader import load_model
    from edge_sdk.converters.validate import run_all
    from edge_sdk.runtime.backends.base import BackendOptions, get_backend

    path = _leaky_integrator(tmp_path / "integrator.onnx")
    loaded = load_model(path, tmp_path)
    session = get_backend("onnxruntime").load([loaded.path], loaded.inputs, loaded.outputs, BackendOptions(threads=1))
    ones, recorded = np.ones((1, 4), np.float32), np.full((1, 4), 7.0, np.float32)
    # Steps 2-3 carry a recorded state the session never returned; step 4's zeros start a new stream.
    steps = [{"x": ones, "h": np.zeros((1, 4), np.float32)}, {"x": ones, "h": recorded}, {"x": ones, "h": recorded},
             {"x": ones, "h": np.zeros((1, 4), np.float32)}]
    streamed = [o["y"][0, 0] for o in run_all(session, steps, {"h": "hN"})]
    assert np.allclose(streamed, [1.0, 1.9, 2.71, 1.0])
    assert np.allclose([o["y"][0, 0] for o in run_all(session, steps)], [1.0, 7.3, 7.3, 1.0])  # teacher-forced

    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(0, 1, (1, 4)).astype(np.float32), "h": np.zeros((1, 4), np.float32)} for _ in range(24)]
    manifest = edge_sdk.convert(path, ["intel-nuc"], tmp_path / "rel", calibration=feeds, targets=["onnx"],
                                state={"h": "hN"}, latency_runs=3, mixed_precision=False)
    assert any("validation streams its 8 samples as consecutive steps, each variant carrying its own state (h <- hN)" in n
               for n in manifest.report.notes), manifest.report.notes
    with pytest.raises(ConfigError, match=r"--state h=y_next: expected an input=output pair of the model "
                                          r"\(inputs \['h', 'x'\], outputs \['hN', 'y'\]\)"):
        edge_sdk.convert(path, ["intel-nuc"], tmp_path / "rel2", calibration=feeds, targets=["onnx"], state={"h": "y_next"})
    with pytest.raises(ConfigError, match="--state 'h=': expected INPUT=OUTPUT"):
        edge_sdk.convert(path, ["intel-nuc"], tmp_path / "rel3", calibration=feeds, targets=["onnx"], state=["h="])


def test_lstm_weights_get_int8_from_dynamic_quantization_beside_static_qdq(tmp_path):
    """onnxruntime's QDQ quantizer leaves an LSTM FP32 (silero-vad: 0.59x the size); the recipe that
    gives LSTMs dynamic INT8 weights first, then static QDQ to the rest, quantizes both."""
    from edge_sdk.converters.loader import load_model, model_facts
    from edge_sdk.converters.targets.base import ExportRequest, get_target

    from .targets.conftest import make_stateful_lstm

    loaded = load_model(samples.save(make_stateful_lstm(features=32, hidden=96, head_bias=True), tmp_path / "lstm.onnx"), tmp_path)
    target = get_target("onnx")
    recipes = {r.name: r for r in target.recipes(Precision.INT8)}
    recipe = recipes["qdq-conv-matmul-dynamic-lstm"]
    no_lstm = model_facts(onnx.load(str(_leaky_integrator(tmp_path / "integrator.onnx"))))
    assert recipe.applies(loaded.facts) is None and recipe.applies(no_lstm) == "the graph has no LSTM"
    rng = np.random.default_rng(2)
    feeds = [{"frame": rng.standard_normal((1, 32)).astype(np.float32),
              "state": rng.standard_normal((2, 1, 96)).astype(np.float32) * 0.5} for _ in range(16)]
    result = target.export(ExportRequest(model_path=loaded.path, precision=Precision.INT8, out_dir=tmp_path / "out",
                                         variant_id="onnx-int8", inputs=loaded.inputs, outputs=loaded.outputs,
                                         calibration=feeds, recipe=recipe))
    ops = [n.op_type for n in onnx.load(str(result.files[0])).graph.node]
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops and "QuantizeLinear" in ops  # the head MatMul: QDQ
    assert result.files[0].stat().st_size < 0.4 * loaded.path.stat().st_size
    assert not list((tmp_path / "out").glob("*.dynamic-weights.onnx"))  # the intermediate model is gone
    fp32 = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    for sample in feeds[:4]:
        expected, got = fp32.run(None, sample), int8.run(None, sample)
        assert np.abs(got[1] - expected[1]).max() < 0.1 * np.abs(expected[1]).max()  # the next state


def _conv_net(path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)
               for name, shape in (("w1", (8, 1, 3, 3)), ("w2", (1, 8, 1, 1)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")],
        "spiky", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 256, 256])], weights)
    return samples.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_percentile_ranges_keep_precision_that_one_outlying_activation_would_take(tmp_path):
    """One calibration pixel of 500 among a million in [0, 1] stretches min/max ranges until the
    usual values fall in one or two INT8 steps; the percentile recipe clips it (PP-OCRv4 det)."""
    from edge_sdk.converters.loader import load_model
    from edge_sdk.converters.targets.base import CalibrationMethod, ExportRequest, get_target

    loaded = load_model(_conv_net(tmp_path / "spiky.onnx"), tmp_path)
    rng = np.random.default_rng(6)
    calibration = [{"x": rng.random((1, 1, 256, 256), np.float32)} for _ in range(16)]
    calibration[3]["x"][0, 0, 60, 60] = 500.0
    held_out = [{"x": rng.random((1, 1, 256, 256), np.float32)} for _ in range(4)]
    target = get_target("onnx")
    recipes = {r.name: r for r in target.recipes(Precision.INT8)}
    assert recipes["qdq-conv-matmul-percentile"].options.calibration_method is CalibrationMethod.PERCENTILE
    fp32 = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"])
    errors = {}
    for name in ("qdq-conv-matmul", "qdq-conv-matmul-percentile"):
        result = target.export(ExportRequest(model_path=loaded.path, precision=Precision.INT8, out_dir=tmp_path / name,
                                             variant_id="onnx-int8", inputs=loaded.inputs, outputs=loaded.outputs,
                                             calibration=calibration, recipe=recipes[name]))
        int8 = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
        errors[name] = max(float(np.abs(int8.run(None, s)[0] - fp32.run(None, s)[0]).mean()) for s in held_out)
        assert any(("percentile" if "percentile" in name else "minmax") + " calibration" in n for n in result.notes)
    assert errors["qdq-conv-matmul-percentile"] < 0.2 * errors["qdq-conv-matmul"]
