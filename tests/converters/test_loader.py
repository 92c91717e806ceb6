"""Loading and checking models: every bad input is one clear ModelError/ConfigError naming it."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_sdk import samples
from edge_sdk.converters.loader import load_model, parse_input_shapes, read_model
from edge_sdk.errors import ConfigError, ModelError


def _tiny(opset: int = 17, shape=(1, 4)) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_loads_sample_and_describes_signature(cnn_path, tmp_path):
    loaded = load_model(cnn_path, tmp_path)
    assert [(s.name, s.shape, s.dtype) for s in loaded.inputs] == [("image", [1, 3, 32, 32], "float32")]
    assert [(s.name, s.shape) for s in loaded.outputs] == [("logits", [1, 10])]
    assert loaded.opset == 17 and loaded.path.is_file()
    assert len(loaded.source_sha256) == 64


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model\n", bytes(range(256)) * 8])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=str(path)):
        load_model(path, tmp_path)


def test_truncated_protobuf(cnn_path, tmp_path):
    data = cnn_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        load_model(path, tmp_path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx", tmp_path)
    with pytest.raises(ModelError, match="not a file"):
        load_model(tmp_path, tmp_path)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.eye(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    model = _tiny()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": "../secret.bin", "offset": "0", "length": "64"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="path traversal"):
        load_model(path, tmp_path)


def test_external_data_inside_the_folder_is_loaded(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = _tiny()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = load_model(folder / "m.onnx", tmp_path)
    # The checked copy is self-contained: it runs without the external file next to it.
    (folder / "weights.bin").unlink()
    session = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)[None]
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)


def test_unsupported_opset(tmp_path):
    path = tmp_path / "future.onnx"
    path.write_bytes(_tiny(opset=99).SerializeToString())
    with pytest.raises(ModelError, match="unsupported opset 99"):
        load_model(path, tmp_path)


def test_old_opset_is_upgraded_to_13(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(_tiny(opset=9), str(path))
    loaded = load_model(path, tmp_path / "")
    assert loaded.source_opset == 9 and loaded.opset == 13
    assert any("upgraded opset 9 -> 13" in n for n in loaded.notes)


def test_a_failed_opset_upgrade_keeps_the_model_and_says_what_it_costs(tmp_path, monkeypatch):
    def fail(model, version):
        raise RuntimeError("no adapter for op Upsample")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    path = tmp_path / "old.onnx"
    onnx.save(_tiny(opset=9), str(path))
    loaded = load_model(path, tmp_path / "")
    assert loaded.opset == 9 and loaded.facts.opset == 9
    assert any("opset 9 kept: upgrading to 13 failed" in n and "per-channel INT8 recipes need >= 13" in n for n in loaded.notes)
    from edge_sdk.converters.targets.onnx import INT8_RECIPES

    assert INT8_RECIPES[0].skip_reason(loaded.facts, has_calibration=True) == "per-channel QDQ needs opset >= 13 (the model has 9)"


def test_a_dynamic_batch_becomes_1_with_a_note_and_input_shape_still_decides(tmp_path):
    path = samples.save(samples.make_cnn(batch="N"), tmp_path / "dyn.onnx")
    loaded = load_model(path, tmp_path)
    assert loaded.inputs[0].shape == [1, 3, 32, 32] and loaded.outputs[0].shape == [1, 10]
    assert any("dynamic batch dim 'N' fixed to 1" in n for n in loaded.notes)
    loaded = load_model(path, tmp_path, parse_input_shapes(["image=2,3,32,32"]))
    assert loaded.inputs[0].shape == [2, 3, 32, 32] and loaded.outputs[0].shape == [2, 10]
    assert any("fixed to [2, 3, 32, 32]" in n for n in loaded.notes)


def test_other_dynamic_dims_come_from_the_samples_when_they_agree(tmp_path):
    path = samples.save(samples.make_token_model(), tmp_path / "tokens.onnx")
    source = read_model(path)
    assert [s.shape for s in source.inputs] == [[1, "seq"], [1, "seq"]]  # batch fixed, seq left to the samples
    with pytest.raises(ModelError, match=r"has dynamic dimensions \[1, 'seq'\]; pass --input-shape input_ids=1,N"):
        read_model(path).finish(tmp_path)
    with pytest.raises(ModelError, match=r"'seq' is \[7, 9\] in the samples\); pass --input-shape input_ids=1,9 "
                                          r"and samples of that shape"):
        read_model(path).finish(tmp_path, {"input_ids": [(1, 7), (1, 9)], "attention_mask": [(1, 7), (1, 9)]})
    loaded = source.finish(tmp_path, {"input_ids": [(1, 9), (1, 9)], "attention_mask": [(1, 9)]})
    assert [s.shape for s in loaded.inputs] == [[1, 9], [1, 9]] and [s.dtype for s in loaded.inputs] == ["int64", "int64"]
    assert loaded.outputs[0].shape == [1, 16]
    assert any("dynamic dims ['seq'] fixed to [9], the size every sample has" in n for n in loaded.notes)


def test_symbolic_output_dims_left_by_shape_inference_come_from_an_fp32_run(tmp_path):
    # Tile's repeats come from a Max of constants: shape inference cannot see the result (``unk__44``).
    repeats = [numpy_helper.from_array(np.array([1, 2], np.int64), "a"), numpy_helper.from_array(np.ones(2, np.int64), "b")]
    graph = helper.make_graph([helper.make_node("Max", ["a", "b"], ["reps"], name="reps"),
                               helper.make_node("Tile", ["x", "reps"], ["y"], name="tile")], "tile",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__44", "unk__45"])], repeats)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tile.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path, tmp_path)
    assert loaded.outputs[0].shape == [1, 8]
    assert any("resolved 1 symbolic output/intermediate shapes from an FP32 run" in n for n in loaded.notes)
    assert [d.dim_value for d in onnx.load(str(loaded.path)).graph.output[0].type.tensor_type.shape.dim] == [1, 8]


def _branchy(path):
    """x [1, n] through an If on ``fast``: the then-branch is Identity, the else-branch reshapes x
    to rows of 3, so it type-checks only when n is unknown or a multiple of 3 (silero-vad's shape:
    the 8 kHz branch at the 16 kHz chunk length)."""
    shape = numpy_helper.from_array(np.array([-1, 3], np.int64), "rows")
    flat = numpy_helper.from_array(np.array([1, -1], np.int64), "flat")
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"], name="same")], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [None, None])])
    other = helper.make_graph([helper.make_node("Reshape", ["x", "rows"], ["r"], name="rows3"),
                               helper.make_node("Reshape", ["r", "flat"], ["y_else"], name="back")], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [None, None])])
    graph = helper.make_graph([helper.make_node("If", ["fast"], ["y"], name="pick", then_branch=then, else_branch=other)],
                              "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n"]),
                                          helper.make_tensor_value_info("fast", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])], [shape, flat])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_an_input_dim_onnxruntime_refuses_once_fixed_stays_dynamic_with_a_note(tmp_path):
    path = _branchy(tmp_path / "branchy.onnx")
    feeds = {"x": np.arange(4, dtype=np.float32)[None], "fast": np.array(True)}
    loaded = read_model(path, {"x": (1, 4)}).finish(tmp_path, samples=[feeds])
    assert [s.shape for s in loaded.inputs] == [[1, "n"], []]  # batch fixed, n left as the file has it
    note = next(n for n in loaded.notes if "kept dynamic" in n)
    assert note.startswith("input x: axes 1 (size 4) kept dynamic: onnxruntime refuses the model with them fixed (Node (")
    assert "Reshape" in note and "\n" not in note and "ONNXRuntimeError" not in note, note
    session = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"])
    assert session.run(None, feeds)[0].tolist() == [[0.0, 1.0, 2.0, 3.0]]
    # A size that type-checks in both branches is fixed as asked.
    assert [s.shape for s in load_model(path, tmp_path, {"x": (1, 6)}).inputs] == [[1, 6], []]


@pytest.mark.parametrize("spec, message", [
    (["image"], "expected NAME=D1"),
    (["image=1,x,3"], "must be integers"),
    (["image=0,3"], "positive"),
])
def test_bad_input_shape_syntax(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_input_shapes(spec)


def test_input_shape_for_unknown_input_or_wrong_rank(cnn_path, tmp_path):
    with pytest.raises(ConfigError, match="not inputs"):
        load_model(cnn_path, tmp_path, {"audio": (1, 2)})
    with pytest.raises(ConfigError, match="rank 3"):
        load_model(cnn_path, tmp_path, {"image": (1, 3, 32)})
