"""Specializing a model on constant inputs (``--constant-input``) and on its static shapes: the ``If``
nodes they decide are replaced by the branch taken, outputs unchanged, and the release serves the
same signature (the constant input optional, and checked)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_sdk
from edge_sdk.converters.loader import read_model
from edge_sdk.converters.specialize import parse_constant_inputs
from edge_sdk.errors import ConfigError, InputError
from edge_sdk.runtime.model import EdgeModel

from .test_loader import _branchy


def _saved(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("fast, width", [(True, 4), (False, 6)])
def test_a_constant_input_inlines_the_branch_it_takes_and_fixes_what_it_blocked(tmp_path, fast, width):
    path = _branchy(tmp_path / "branchy.onnx")
    x = np.arange(width, dtype=np.float32)[None]
    loaded = read_model(path, {"x": (1, width)}, {"fast": fast}).finish(tmp_path)
    # At width 4 the else branch does not type-check: with it gone, the shape is fixed as asked.
    assert [(s.name, s.shape) for s in loaded.inputs] == [("x", [1, width])]
    assert [(s.name, s.dtype, s.constant) for s in loaded.constants] == [("fast", "bool", fast)]
    assert "If" not in _ops(loaded.path)
    assert any(n.startswith(f"--constant-input fast={fast}: no longer an input (1 If node(s) replaced")
               for n in loaded.notes), loaded.notes
    np.testing.assert_array_equal(_run(loaded.path, {"x": x}), _run(path, {"x": x, "fast": np.array(fast)}))


def _nested(path):
    """y = x * 2 when ``mode == 1``, through two nested Ifs on ``mode`` (the inner one reads an
    outer name), x * 3 otherwise; the inner branch writes a name the main graph also uses."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")

    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4])])

    inner = helper.make_node("If", ["is_one"], ["inner_y"], name="inner",
                             then_branch=branch("t2", [helper.make_node("Mul", ["x", "two"], ["scaled"])], "scaled"),
                             else_branch=branch("e2", [helper.make_node("Mul", ["x", "three"], ["tripled"])], "tripled"))
    outer = helper.make_node("If", ["is_one"], ["y"], name="outer",
                             then_branch=branch("t1", [inner], "inner_y"),
                             else_branch=branch("e1", [helper.make_node("Mul", ["x", "three"], ["other"])], "other"))
    graph = helper.make_graph(
        [helper.make_node("Equal", ["mode", "one"], ["is_one"]), outer,
         helper.make_node("Add", ["y", "x"], ["scaled_sum"]), helper.make_node("Identity", ["scaled_sum"], ["z"])],
        "nested", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                   helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])], [two, three, one])
    return _saved(graph, path)


def test_nested_ifs_on_the_constant_all_go_and_outputs_are_unchanged(tmp_path):
    path = _nested(tmp_path / "nested.onnx")
    x = np.arange(4, dtype=np.float32)[None]
    loaded = read_model(path, constant_inputs={"mode": 1}).finish(tmp_path)
    assert sorted(_ops(loaded.path)) == ["Add", "Identity", "Mul"]
    assert any("2 If node(s) replaced" in n and "1 nodes that fed nothing dropped" in n for n in loaded.notes), loaded.notes
    np.testing.assert_array_equal(_run(loaded.path, {"x": x}), x * 2 + x)
    np.testing.assert_array_equal(_run(loaded.path, {"x": x}), _run(path, {"x": x, "mode": np.array(1)}))


def _double_if_batch_one(path):
    """An If on the input's shape (exporters write them for squeezes and RNN batches): doubles x
    when its dynamic batch is 1, passes it through otherwise."""
    def branch(name, node, out):
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, 3])])

    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
         helper.make_node("Equal", ["batch", "one"], ["single"]),
         helper.make_node("If", ["single"], ["y"], name="double_if_one",
                          then_branch=branch("then", helper.make_node("Add", ["x", "x"], ["doubled"]), "doubled"),
                          else_branch=branch("else", helper.make_node("Identity", ["x"], ["same"]), "same"))],
        "double", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one")])
    return _saved(graph, path)


def test_an_if_the_static_shapes_decide_is_inlined_with_a_note(tmp_path):
    path = _double_if_batch_one(tmp_path / "double.onnx")
    loaded = read_model(path).finish(tmp_path)  # the dynamic batch becomes 1: the If doubles
    assert _ops(loaded.path) == ["Add"]
    assert "1 If node(s) decided by the static shapes replaced by the branch taken" in loaded.notes
    x = np.arange(3, dtype=np.float32)[None]
    np.testing.assert_array_equal(_run(loaded.path, {"x": x}), 2 * x)


def test_without_constants_or_shape_decided_ifs_the_model_keeps_its_if(tmp_path):
    path = _branchy(tmp_path / "branchy.onnx")
    loaded = read_model(path, {"x": (1, 6)}).finish(tmp_path)
    assert "If" in _ops(loaded.path) and loaded.constants == []


@pytest.mark.parametrize("specs, message", [
    (["sr"], "expected NAME=VALUE"),
    (["sr="], "expected NAME=VALUE"),
    (["sr=16k"], "--constant-input sr=16k: values must be numbers"),
    ({"sr": "16000"}, "expected a number"),
    ({"sr": []}, "expected a number"),
])
def test_bad_constant_input_syntax(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_constant_inputs(specs)


def test_constant_input_cli_form_parses_scalars_and_vectors():
    parsed = parse_constant_inputs(["sr=16000", "gains=0.5,1,2"])
    assert parsed["sr"].tolist() == 16000 and parsed["gains"].tolist() == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("constants, message", [
    ({"rate": 1}, r"--constant-input rate: the model has no input 'rate' \(inputs: \['fast', 'x'\]\)"),
    ({"fast": 2}, "does not fit the input's type bool"),
    ({"fast": [1, 0]}, r"2 values do not fit the input's shape \[\]"),
])
def test_a_constant_input_that_does_not_fit_the_model_is_a_clear_error(tmp_path, constants, message):
    with pytest.raises(ConfigError, match=message):
        read_model(_branchy(tmp_path / "branchy.onnx"), {"x": (1, 4)}, constants)


def test_input_shape_and_constant_input_for_the_same_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"both name \['fast'\]"):
        edge_sdk.convert(_branchy(tmp_path / "b.onnx"), ["generic-x86_64"], tmp_path / "rel",
                         input_shapes={"fast": (1,)}, constant_inputs={"fast": True})


def test_a_release_serves_the_original_signature_with_the_constant_optional_and_checked(tmp_path):
    path = _branchy(tmp_path / "branchy.onnx")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.random((1, 4), dtype=np.float32), "fast": np.array(True)} for _ in range(12)]
    manifest = edge_sdk.convert(path, ["generic-x86_64"], tmp_path / "rel", calibration=samples, targets=["onnx"],
                                input_shapes={"x": (1, 4)}, constant_inputs={"fast": True}, latency_runs=5,
                                footprint=False)
    fp32 = manifest.variant("onnx-fp32")
    assert [(s.name, s.constant) for s in fp32.inputs] == [("x", None), ("fast", True)]
    from edge_sdk.daemon.kserve import model_config  # what Triton clients read: the constant is optional

    config = model_config("branchy", manifest, "onnx-fp32", "onnxruntime", "fp32", [1])
    assert [(i["name"], i.get("optional", False)) for i in config["input"]] == [("x", False), ("fast", True)]
    x = samples[0]["x"]
    with EdgeModel.load(tmp_path / "rel", profile="generic-x86_64", precision="fp32", monitor=False) as model:
        expected = x  # fast=True: the Identity branch
        np.testing.assert_array_equal(model.run({"x": x})["y"], expected)
        np.testing.assert_array_equal(model.run({"x": x, "fast": np.array(True)})["y"], expected)
        with pytest.raises(InputError, match=r"input 'fast' was fixed at True when the model was converted"):
            model.run({"x": x, "fast": np.array(False)})
        with pytest.raises(InputError, match="missing \\['x'\\]"):
            model.run({"fast": np.array(True)})
        np.testing.assert_array_equal(model.run({"x": x})["y"], expected)  # still serving


def test_samples_that_give_another_value_for_a_constant_input_are_refused(tmp_path):
    path = _branchy(tmp_path / "branchy.onnx")
    samples = [{"x": np.zeros((1, 4), np.float32), "fast": np.array(k != 3)} for k in range(10)]
    with pytest.raises(ConfigError, match=r"calibration sample 3: input 'fast' was fixed at True"):
        edge_sdk.convert(path, ["generic-x86_64"], tmp_path / "rel", calibration=samples, targets=["onnx"],
                         input_shapes={"x": (1, 4)}, constant_inputs={"fast": True})


def test_an_integer_input_that_never_varies_and_decides_an_if_is_pointed_out(tmp_path):
    path = _nested(tmp_path / "nested.onnx")
    samples = [{"x": np.full((1, 4), k, np.float32), "mode": np.array(1)} for k in range(10)]
    manifest = edge_sdk.convert(path, ["generic-x86_64"], tmp_path / "rel", calibration=samples, targets=["onnx"],
                                latency_runs=3, footprint=False, mixed_precision=False)
    assert ("input mode is 1 in every sample and decides 1 If node(s): if the device never feeds another value, "
            "--constant-input mode=1 inlines the branch taken") in manifest.report.notes
    varied = [{**s, "mode": np.array(k % 2)} for k, s in enumerate(samples)]
    manifest = edge_sdk.convert(path, ["generic-x86_64"], tmp_path / "rel2", calibration=varied, targets=["onnx"],
                                latency_runs=3, footprint=False, mixed_precision=False)
    assert not [n for n in manifest.report.notes if "--constant-input" in n]
