"""The accuracy measure follows what the model outputs; --metric specs fail with one clear line."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_sdk.converters import metrics
from edge_sdk.converters.metrics import OutputKind, default_metric, from_spec, output_kind
from edge_sdk.errors import ConfigError

RNG = np.random.default_rng(0)


def _model(op: str, name: str, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], [name], name="head", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _normalised(name: str) -> onnx.ModelProto:
    nodes = [helper.make_node("ReduceL2", ["x"], ["norm"], axes=[1], keepdims=1), helper.make_node("Div", ["x", "norm"], [name])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model, name, value, kind", [
    (_model("Softmax", "out", axis=-1), "out", RNG.random((1, 1000)), OutputKind.CLASS_SCORES),
    (_model("Identity", "logits"), "logits", RNG.standard_normal((1, 10)), OutputKind.CLASS_SCORES),
    (_model("Identity", "output"), "output", RNG.standard_normal((1, 10)), OutputKind.CLASS_SCORES),  # a plain head
    (_model("Sigmoid", "maps"), "maps", RNG.random((1, 1, 64, 64)), OutputKind.PROBABILITY_MAP),
    (_model("Identity", "heatmap"), "heatmap", RNG.random((1, 2, 32, 32)), OutputKind.PROBABILITY_MAP),
    (_normalised("output"), "output", RNG.standard_normal((1, 384)), OutputKind.EMBEDDING),
    (_model("Identity", "last_hidden_state"), "last_hidden_state", RNG.standard_normal((1, 7, 384)), OutputKind.EMBEDDING),
    (_model("Identity", "depth"), "depth", 10 * RNG.standard_normal((1, 1, 32, 32)), OutputKind.VALUES),
    (_model("Identity", "ids"), "ids", np.arange(4).reshape(1, 4), OutputKind.INTEGERS),
])
def test_the_output_kind_decides_the_default(model, name, value, kind):
    assert output_kind(model, name, [value]).kind is kind


def test_defaults_measure_what_each_kind_means():
    embedding = [{"e": RNG.standard_normal((1, 64))} for _ in range(4)]
    metric = default_metric(_normalised("e"), embedding)
    assert metric.name == "cosine similarity" and metric(embedding) == pytest.approx(1.0)
    # A small perturbation moves every argmax of an embedding but not its cosine.
    noisy = [{"e": o["e"] + 0.05 * RNG.standard_normal((1, 64))} for o in embedding]
    assert metric(noisy) > 0.99
    maps = [{"m": np.where(RNG.random((1, 1, 32, 32)) > 0.9, 0.95, 0.02)} for _ in range(3)]
    f1 = default_metric(_model("Sigmoid", "m"), maps)
    assert f1.name == "thresholded-map F1" and f1(maps) == 1.0
    # Background noise well below every threshold changes every pixel value but no detection.
    shifted = [{"m": o["m"] + 0.05 * RNG.random((1, 1, 32, 32))} for o in maps]
    assert f1(shifted) == 1.0 and metrics.cosine(maps, "m")(shifted) < 0.999
    assert f1([{"m": np.zeros((1, 1, 32, 32))} for _ in maps]) == 0.0


def test_map_agreement_ignores_what_no_detector_sees_and_counts_what_it_loses():
    heat = np.zeros((1, 1, 48, 48))
    heat[0, 0, 10:13, 10:13] = 0.9  # a confident object
    heat[0, 0, 30:32, 30:32] = 0.52  # an object right at the 0.5 threshold
    reference = [{"heat": heat}]
    metric = metrics.map_f1(reference, "heat")
    moved = np.roll(heat, 1, axis=-1)  # every edge one pixel over
    flicker = heat.copy()
    flicker[0, 0, 30:32, 30:32] = 0.48  # falls just under the threshold
    assert metric([{"heat": moved}]) == 1.0 and metric([{"heat": flicker}]) == 1.0
    lost = heat.copy()
    lost[0, 0, 10:13, 10:13] = 0.1  # the confident object is gone
    assert metric([{"heat": lost}]) < 0.7


def test_a_user_metric_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(textwrap.dedent("""
        def mean_score(outputs):
            return float(sum(o["out"].mean() for o in outputs) / len(outputs))

        def broken(outputs):
            raise ValueError("labels file not found")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reference = [{"out": np.full((1, 4), 0.5, np.float32)}]
    model = _model("Identity", "out")
    assert from_spec("my_metrics:mean_score", model, reference, None)(reference) == 0.5
    with pytest.raises(ConfigError, match=r"--metric no_such_module:f: cannot import module 'no_such_module' \(ModuleNotFoundError\)"):
        from_spec("no_such_module:f", model, reference, None)
    with pytest.raises(ConfigError, match="module 'my_metrics' has no function 'nope'"):
        from_spec("my_metrics:nope", model, reference, None)
    with pytest.raises(ConfigError, match="my_metrics:broken: raised ValueError on the FP32 outputs: labels file not found"):
        from_spec("my_metrics:broken", model, reference, None)
    with pytest.raises(ConfigError, match="expected one of top1, cosine, f1 or module:function"):
        from_spec("accuracy", model, reference, None)
    sys.modules.pop("my_metrics", None)
