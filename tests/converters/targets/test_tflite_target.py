"""TFLite export through onnx2tf in the isolated `tflite` toolchain, run with LiteRT here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from needs import need_toolchain

from edge_sdk.converters.targets.base import get_target
from edge_sdk.errors import ConversionError
from edge_sdk.types import Precision

pytestmark = [pytest.mark.toolchain, pytest.mark.requires("ai_edge_litert")]


@pytest.fixture(autouse=True)
def _toolchain():
    need_toolchain("tflite")


@pytest.fixture(scope="module")
def exported(cases, tmp_path_factory):
    """``exported(model, precision)``: each onnx2tf conversion (5-15 s) runs once per module and
    model, shared by its precisions as in a conversion."""
    memo = {}
    scratch = tmp_path_factory.mktemp("tflite-scratch")

    def get(model, precision):
        if (model, precision) not in memo:
            out = tmp_path_factory.mktemp(f"tflite-{model}-{precision.value}")
            request = cases[model].request(precision, out, scratch_dir=scratch)
            memo[model, precision] = (get_target("tflite").export(request), out)
        return memo[model, precision]

    return get


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16, Precision.INT8], ids=str)
@pytest.mark.parametrize("model", ["cnn", "multimodal"])
def test_export_and_run_matches_fp32_onnx(cases, parity_check, exported, model, precision):
    case = cases[model]
    result, out_dir = exported(model, precision)
    assert [f.name for f in result.files] == [f"{model}-{precision.value}.tflite"]
    assert sorted(p.name for p in out_dir.iterdir()) == [result.files[0].name]  # no onnx2tf leftovers
    # Each input's layout as onnx2tf made it: 4D NCHW -> NHWC, 3D NCW -> NWC, 2D unchanged.
    expected = {"image": ([0, 2, 3, 1], "NHWC"), "audio": ([0, 2, 1], "NWC"), "imu": (None, None)}
    for spec in result.inputs:
        assert (spec.transpose, spec.layout) == expected[spec.name], spec
        assert spec.artifact_name and spec.name in spec.artifact_name
    assert [s.transpose for s in result.outputs] == [None]
    p = parity_check(case, result, "tflite", precision)
    if precision is Precision.INT8:
        assert result.nodes_quantized and result.nodes_quantized > 0
        assert p.max_abs > 0


def test_int8_without_calibration_is_dynamic_range(cases, parity_check, tmp_path):
    case = cases["cnn"]
    result = get_target("tflite").export(case.request(Precision.INT8, tmp_path, calibrated=False))
    assert any("dynamic-range" in n for n in result.notes)
    parity_check(case, result, "tflite", Precision.INT8)


def test_dynamic_range_is_a_fallback_recipe_even_with_calibration_data(cases, parity_check, tmp_path):
    target = get_target("tflite")
    recipes = {r.name: r for r in target.recipes(Precision.INT8)}
    assert list(recipes) == ["int8", "int8-dynamic-range"] and recipes["int8-dynamic-range"].when == "fallback"
    result = target.export(cases["cnn"].request(Precision.INT8, tmp_path, recipe=recipes["int8-dynamic-range"]))
    assert result.notes[0] == "int8 dynamic-range (the recipe): INT8 weights, float activations"
    assert result.nodes_quantized > 0
    parity_check(cases["cnn"], result, "tflite", Precision.INT8)


def test_sizes_shrink_with_precision(exported):
    sizes = {p: exported("cnn", p)[0].files[0].stat().st_size for p in (Precision.FP32, Precision.FP16, Precision.INT8)}
    assert sizes[Precision.FP16] < 0.6 * sizes[Precision.FP32]
    assert sizes[Precision.INT8] < 0.35 * sizes[Precision.FP32]


def test_calibration_in_the_wrong_layout_is_refused(cases, tmp_path):
    case = cases["cnn"]
    nhwc = [{"image": np.ascontiguousarray(f["image"].transpose(0, 2, 3, 1))} for f in case.calibration[:4]]
    with pytest.raises(ConversionError, match=r"shape \[1, 32, 32, 3\], expected \[1, 3, 32, 32\]"):
        get_target("tflite").export(replace(case.request(Precision.INT8, tmp_path), calibration=nhwc))
    assert not list(tmp_path.iterdir())


def test_onnx2tf_failure_is_a_conversion_error_with_its_output(cases, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model at all")
    with pytest.raises(ConversionError, match=r"^tflite: (onnx2tf failed|cannot read)") as info:
        get_target("tflite").export(replace(cases["cnn"].request(Precision.FP32, tmp_path / "out"), model_path=bad))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_onnx2tf_runs_once_per_model_for_every_precision_and_a_failure_is_not_repeated(cases, tmp_path, monkeypatch):
    from edge_sdk.converters import toolchains

    real_run, conversions = toolchains.run, []

    def counting(name, args, **kwargs):
        if args[:1] == ["-i"]:
            conversions.append(kwargs["cwd"])
        return real_run(name, args, **kwargs)

    monkeypatch.setattr(toolchains, "run", counting)
    scratch = tmp_path / "scratch"
    for precision in (Precision.FP32, Precision.FP16, Precision.INT8):
        result = get_target("tflite").export(cases["cnn"].request(precision, tmp_path / precision.value, scratch_dir=scratch))
        assert result.files[0].stat().st_size > 0
    assert len(conversions) == 1, conversions

    # A graph onnx2tf cannot take: the second export gives the first one's error and log, without a second run.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], name="frob", domain="com.example")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "custom.onnx"))
    errors = []
    for precision in (Precision.FP32, Precision.FP16):
        request = replace(cases["cnn"].request(precision, tmp_path / f"u-{precision.value}", scratch_dir=scratch),
                          model_path=tmp_path / "custom.onnx")
        with pytest.raises(ConversionError) as info:
            get_target("tflite").export(request)
        errors.append((str(info.value), info.value.log))
    assert len(conversions) == 2 and errors[0] == errors[1] and errors[0][1], conversions
    assert errors[0][0].startswith("tflite: onnx2tf") and "\n" not in errors[0][0]


def test_int8_keeps_an_integer_input_integer(cases, parity_check, exported):
    """Token ids are int32: calibration feeds them as int32 and the artifact still takes int32."""
    result, _ = exported("tokens", Precision.INT8)
    assert any("full-integer" in n for n in result.notes)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(result.files[0]))
    assert [d["dtype"] for d in interpreter.get_input_details()] == [np.int32]
    assert result.nodes_quantized > 0
    parity_check(cases["tokens"], result, "tflite", Precision.INT8)


def test_float_calibration_for_an_integer_input_is_refused(cases, tmp_path):
    case = cases["tokens"]
    floats = [{"tokens": f["tokens"].astype(np.float32)} for f in case.calibration[:4]]
    with pytest.raises(ConversionError, match=r"^tflite: calibration sample 0 gives input 'tokens' as float32; the model takes int32$"):
        get_target("tflite").export(replace(case.request(Precision.INT8, tmp_path), calibration=floats))


def test_an_op_tflite_has_no_kernel_for_is_rewritten_into_builtin_ops(tmp_path):
    """A transformer's GELU is Erf, which TFLite only has as a TF Select op that LiteRT cannot run."""
    from math import erf

    import onnx
    from onnx import TensorProto, helper

    from edge_sdk.converters.targets.base import ExportRequest
    from edge_sdk.manifest import TensorSpec
    from edge_sdk.runtime.backends.base import BackendOptions, get_backend

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="erf")], "erf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "erf.onnx"))
    specs = ([TensorSpec(name="x", dtype="float32", shape=[1, 16])], [TensorSpec(name="y", dtype="float32", shape=[1, 16])])
    result = get_target("tflite").export(ExportRequest(model_path=tmp_path / "erf.onnx", precision=Precision.FP32,
                                                       out_dir=tmp_path / "out", variant_id="erf", inputs=specs[0],
                                                       outputs=specs[1]))
    assert any(n.startswith("onnx2tf: Erf rewritten into builtin TFLite ops") for n in result.notes), result.notes
    assert b"FlexErf" not in result.files[0].read_bytes()
    x = np.linspace(-3, 3, 16, dtype=np.float32)[None]
    session = get_backend("tflite").load(result.files, result.inputs, result.outputs, BackendOptions(threads=1))
    assert np.allclose(session.run({"x": x})["y"], [[erf(v) for v in x[0]]], atol=1e-3)


def test_stale_symbolic_output_shapes_are_re_inferred(tmp_path):
    """An exporter's value_info for a dynamic batch (``unk__44``) outlives fixing the input."""
    import onnx

    from edge_sdk.converters.targets.tflite import static_copy
    from edge_sdk.samples import make_cnn

    model = make_cnn()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "unk__44"
    stale = onnx.helper.make_tensor_value_info("stem", onnx.TensorProto.FLOAT, ["unk__1", 16, "h", "w"])
    model.graph.value_info.append(stale)
    onnx.save(model, tmp_path / "stale.onnx")
    static_copy(tmp_path / "stale.onnx", tmp_path / "static.onnx")
    fixed = onnx.load(tmp_path / "static.onnx")
    for value in (*fixed.graph.output, *fixed.graph.value_info):
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value


@pytest.mark.slow
def test_identical_exports_are_byte_identical(cases, exported, tmp_path):
    first, _ = exported("multimodal", Precision.INT8)
    again = get_target("tflite").export(cases["multimodal"].request(Precision.INT8, tmp_path))
    assert first.files[0].read_bytes() == again.files[0].read_bytes()


def test_int8_calibrates_an_input_whose_name_is_not_a_python_identifier(cases, parity_check, tmp_path):
    """PyTorch exports name inputs ``input.1``: the SavedModel's signature keyword becomes ``input_1``
    while the converted model's signature (what TensorFlow's calibrator looks samples up by) keeps
    ``input.1``. Seen on CenterFace as ``KeyError: 'input.1'``."""
    import onnx

    case = cases["cnn"]
    model = onnx.load(str(case.path))
    for node in model.graph.node:
        node.input[:] = ["input.1" if name == "image" else name for name in node.input]
    model.graph.input[0].name = "input.1"
    path = tmp_path / "dotted.onnx"
    onnx.save(model, str(path))

    def rename(feeds):
        return [{"input.1": f["image"]} for f in feeds]

    dotted = replace(case, path=path, inputs=[case.inputs[0].model_copy(update={"name": "input.1"})],
                     calibration=rename(case.calibration), validation=rename(case.validation))
    result = get_target("tflite").export(dotted.request(Precision.INT8, tmp_path / "out"))
    assert any("full-integer" in n for n in result.notes)
    assert result.nodes_quantized > 0
    parity_check(dotted, result, "tflite", Precision.INT8)


def test_node_names_tensorflow_refuses_as_scopes_are_made_safe(tmp_path):
    """PP-OCR's classifier names a node ``Softmax@0``; onnx2tf makes it a TF name scope, which TF refuses."""
    import onnx

    from edge_sdk.converters.targets.tflite import static_copy
    from edge_sdk.samples import make_cnn

    model = make_cnn()
    model.graph.node[-1].name = "Softmax@0"
    model.graph.node[-2].name = "Softmax_0"  # the safe spelling is taken: stays unique
    onnx.save(model, tmp_path / "at.onnx")
    static_copy(tmp_path / "at.onnx", tmp_path / "safe.onnx")
    names = [n.name for n in onnx.load(tmp_path / "safe.onnx").graph.node]
    assert names[-2:] == ["Softmax_0", "Softmax_0_1"] and len(set(names)) == len(names)
    assert [o.name for o in onnx.load(tmp_path / "safe.onnx").graph.output] == [o.name for o in model.graph.output]


def test_a_recurrent_state_input_is_kept_in_its_onnx_layout_when_channel_last_breaks(cases, parity_check, exported,
                                                                                      tmp_path):
    """silero-vad's pattern: onnx2tf's NCW -> NWC move of a state [2, 1, H] breaks the LSTM reading it;
    the retry keeps that input's layout (-kat) and says so."""
    result, _ = exported("stateful", Precision.FP32)
    assert any(n.startswith("onnx2tf: inputs state kept in their ONNX layout (-kat), as channel-last onnx2tf failed")
               for n in result.notes), result.notes
    assert [(s.name, s.transpose, s.layout) for s in result.inputs] == [("frame", None, None), ("state", None, None)]
    parity_check(cases["stateful"], result, "tflite", Precision.FP32)
    dynamic = next(r for r in get_target("tflite").recipes(Precision.INT8) if r.name == "int8-dynamic-range")
    int8 = get_target("tflite").export(cases["stateful"].request(Precision.INT8, tmp_path, recipe=dynamic,
                                                                 scratch_dir=tmp_path / "scratch"))
    parity_check(cases["stateful"], int8, "tflite", Precision.INT8)


def test_outputs_whose_unit_axes_moved_are_matched_with_the_permutation_back():
    from edge_sdk.converters.targets.tflite import _ones_moved

    assert _ones_moved([1, 2, 128], [2, 1, 128]) == [1, 0, 2]
    assert _ones_moved([2, 128, 1], [2, 1, 128]) == [0, 2, 1]
    assert _ones_moved([128, 2, 1], [2, 1, 128]) is None  # the big axes swapped: not a reshape
    assert _ones_moved([2, 1, 128], [2, 1, 128]) is None and _ones_moved([2, 128], [2, 1, 128]) is None


def test_multi_axis_slices_are_cut_on_their_own_axes_and_copies_dropped(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edge_sdk.converters.targets.tflite import static_copy

    big = np.iinfo(np.int64).max
    ints = lambda name, values: numpy_helper.from_array(np.asarray(values, np.int64), name)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s0", "e0", "a0"], ["low"], name="low"),  # axes 0-2, only axis 1 cut
         helper.make_node("Slice", ["x", "s1", "e1"], ["copy"], name="copy"),  # cuts nothing
         helper.make_node("Add", ["low", "low"], ["y"]), helper.make_node("Identity", ["copy"], ["z"])],
        "slices", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 4])],
        [ints("s0", [0, 0, 0]), ints("e0", [big, 3, big]), ints("a0", [0, 1, 2]), ints("s1", [0]), ints("e1", [big])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "slices.onnx")
    static_copy(tmp_path / "slices.onnx", tmp_path / "static.onnx")
    fixed = onnx.load(tmp_path / "static.onnx")
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in fixed.graph.initializer}
    (low,) = [n for n in fixed.graph.node if n.op_type == "Slice"]
    assert [constants[name] for name in low.input[1:]] == [[0], [3], [1]]
    x = np.random.default_rng(0).random((1, 6, 4), dtype=np.float32)
    before = ort.InferenceSession(str(tmp_path / "slices.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    after = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
