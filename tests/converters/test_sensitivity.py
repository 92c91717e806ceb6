"""Keeping the sensitive nodes in FP32: FP16 that overflows is repaired instead of given up."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edge_sdk
from edge_sdk.converters import sensitivity


def _overflowing(path):
    """x -> MatMul "project" -> Add "lift" (+1e5, beyond FP16's 65504) -> Sub "shrink" (-99995) -> Relu -> MatMul "head".

    onnxruntime computes FP16 nodes without a CPU kernel in FP32, but an FP16 *constant* is clipped at
    65504 wherever it runs: converted, lift and shrink cancel out and the +5 the model relies on is gone.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w_project"),
             numpy_helper.from_array(np.array(1e5, np.float32), "up"),
             numpy_helper.from_array(np.array(99995.0, np.float32), "down"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w_head")]
    nodes = [helper.make_node("MatMul", ["x", "w_project"], ["projected"], name="project"),
             helper.make_node("Add", ["projected", "up"], ["lifted"], name="lift"),
             helper.make_node("Sub", ["lifted", "down"], ["shifted"], name="shrink"),
             helper.make_node("Relu", ["shifted"], ["act"], name="act"),
             helper.make_node("MatMul", ["act", "w_head"], ["features"], name="head")]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _calibration(count: int):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(count)]


def test_overflowing_nodes_rank_first(tmp_path):
    model = _overflowing(tmp_path / "m.onnx")
    from edge_sdk.converters.loader import load_model

    loaded = load_model(model, tmp_path)
    ranking = sensitivity.fp16_ranking(loaded.path, _calibration(2))
    assert [name for name, score in ranking if score == float("inf")] == ["lift", "shrink"]


def test_fp16_keeps_the_overflowing_ops_in_fp32_instead_of_giving_up(tmp_path):
    model = _overflowing(tmp_path / "m.onnx")
    manifest = edge_sdk.convert(model, ["intel-nuc"], tmp_path / "rel", calibration=_calibration(24), targets=["onnx"],
                                latency_runs=5, speed_gate=False)
    fp16 = manifest.variant("onnx-fp16")
    assert fp16.ok, fp16.reason
    assert fp16.validation.recipe == "fp16-keep-sensitive"
    assert fp16.validation.nodes_kept_fp32 == ["lift", "shrink"]  # the fewest that meet the budget
    tried = {a.recipe: (a.outcome, a.reason) for a in manifest.report.recipes["onnx-fp16"]}
    assert tried["fp16"][0] == "rejected" and "cosine similarity dropped" in tried["fp16"][1]
    search = manifest.report.sensitivity["onnx-fp16"]
    assert search.reached and search.kept_fp32 == ["lift", "shrink"] and len(search.trials) >= 2
    assert fp16.size_bytes < manifest.variant("onnx-fp32").size_bytes
