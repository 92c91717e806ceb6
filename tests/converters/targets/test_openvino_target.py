"""OpenVINO IR export (in the main environment) run with the real OpenVINO runtime."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_sdk.converters.targets.base import get_target
from edge_sdk.errors import ConversionError, MissingDependencyError
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

pytestmark = pytest.mark.requires("openvino")

PRECISIONS = [Precision.FP32, Precision.FP16, Precision.INT8]


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("model", ["cnn", "multimodal"])
def test_export_and_run_matches_fp32_onnx(cases, parity_check, tmp_path, model, precision):
    case = cases[model]
    result = get_target("openvino").export(case.request(precision, tmp_path))
    assert [f.suffix for f in result.files] == [".xml", ".bin"] and all(f.stat().st_size > 0 for f in result.files)
    # OpenVINO keeps the ONNX names and NCHW layout: nothing to rename or transpose.
    assert [(s.name, s.artifact_name, s.transpose) for s in result.inputs] == [(s.name, None, None) for s in case.inputs]
    p = parity_check(case, result, "openvino", precision)
    if precision is Precision.INT8:
        assert result.nodes_quantized and result.nodes_quantized > 0
        assert p.max_abs > 0  # really quantized, not the FP32 graph again


def test_fp16_and_int8_weights_are_smaller(cases, tmp_path):
    sizes = {}
    for precision in PRECISIONS:
        result = get_target("openvino").export(cases["cnn"].request(precision, tmp_path))
        sizes[precision] = result.files[1].stat().st_size
    assert sizes[Precision.FP16] < 0.55 * sizes[Precision.FP32]
    assert sizes[Precision.INT8] < 0.35 * sizes[Precision.FP32]


def test_precision_hint_follows_the_variant(cases, tmp_path):
    import openvino as ov

    result = get_target("openvino").export(cases["cnn"].request(Precision.FP16, tmp_path))
    backend = get_backend("openvino")
    fp32 = backend.load(result.files, result.inputs, result.outputs, BackendOptions(precision=Precision.FP32))
    fp16 = backend.load(result.files, result.inputs, result.outputs, BackendOptions(precision=Precision.FP16))
    assert fp32.precision_hint == "f32"  # never the silent bf16 of avx512_bf16 CPUs
    native_fp16 = "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert fp16.precision_hint == ("f16" if native_fp16 else "f32")
    compiled = fp32._compiled.get_property("INFERENCE_PRECISION_HINT")
    assert compiled == ov.Type.f32


def test_int8_without_calibration_is_refused(cases, tmp_path):
    with pytest.raises(ConversionError, match="calibration"):
        get_target("openvino").export(cases["cnn"].request(Precision.INT8, tmp_path, calibrated=False))
    assert not list(tmp_path.glob("*.xml"))


def test_mixed_is_not_offered(cases, tmp_path):
    target = get_target("openvino")
    assert Precision.MIXED not in target.precisions()
    with pytest.raises(ConversionError, match="mixed"):
        target.export(cases["cnn"].request(Precision.MIXED, tmp_path))


def test_corrupt_model_is_a_conversion_error(cases, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    request = cases["cnn"].request(Precision.FP32, tmp_path)
    from dataclasses import replace

    with pytest.raises(ConversionError, match="openvino: cannot convert bad.onnx"):
        get_target("openvino").export(replace(request, model_path=bad))


def test_a_model_openvino_cannot_convert_names_the_ops_and_the_cause_in_one_line(cases, tmp_path):
    import onnx
    from dataclasses import replace
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "rankless",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],  # rank unknown
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "rankless.onnx"))
    request = replace(cases["cnn"].request(Precision.FP32, tmp_path), model_path=tmp_path / "rankless.onnx")
    with pytest.raises(ConversionError) as raised:
        get_target("openvino").export(request)
    assert str(raised.value) == ("openvino: cannot convert rankless.onnx: its ONNX frontend could not convert Conv-17 "
                                 "(The input data tensor's rank has to be known (static))")


def test_missing_openvino_names_the_extra(monkeypatch, cases, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(MissingDependencyError, match=r"edge-sdk\[openvino\]"):
        get_target("openvino").export(cases["cnn"].request(Precision.FP32, tmp_path))


def test_no_telemetry_files_in_home(cases, tmp_path):
    """Converting and quantizing must not write OpenVINO/NNCF telemetry ids to ~/intel."""
    home = tmp_path / "home"
    home.mkdir()
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from edge_sdk.converters.targets.base import ExportRequest, get_target
        from edge_sdk.manifest import TensorSpec
        from edge_sdk.types import Precision
        spec = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 32, 32])]
        out = [TensorSpec(name="logits", dtype="float32", shape=[1, 10])]
        cal = [{{"image": np.random.default_rng(i).random((1, 3, 32, 32), dtype=np.float32)}} for i in range(4)]
        req = ExportRequest(model_path=Path({str(cases["cnn"].path)!r}), precision=Precision.INT8,
                            out_dir=Path({str(tmp_path / "out")!r}), variant_id="v", inputs=spec, outputs=out,
                            calibration=cal)
        print(len(get_target("openvino").export(req).files))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "CI")}
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("2")
    assert not (home / "intel").exists()


def test_threads_do_not_change_results(cases, tmp_path):
    case = cases["cnn"]
    result = get_target("openvino").export(case.request(Precision.FP32, tmp_path))
    backend = get_backend("openvino")
    one = backend.load(result.files, result.inputs, result.outputs, BackendOptions(threads=1)).run(case.validation[0])
    two = backend.load(result.files, result.inputs, result.outputs, BackendOptions(threads=2)).run(case.validation[0])
    np.testing.assert_allclose(one["logits"], two["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8], ids=str)
def test_identical_exports_are_byte_identical(cases, tmp_path, precision):
    """OpenVINO names new nodes after a process-wide counter: a second export in the same process
    (as in a long-running build) must still write the very same files."""
    digests = []
    for run in range(2):
        result = get_target("openvino").export(cases["multimodal"].request(precision, tmp_path / str(run)))
        digests.append([f.read_bytes() for f in result.files])
    assert digests[0] == digests[1]
    assert "Constant_#" in result.files[0].read_text() or precision is Precision.FP32


def test_fp32_ir_is_right_for_a_consumer_that_sets_no_hint(cases, tmp_path):
    """On CPUs with bf16 (AVX-512 BF16/AMX) OpenVINO computes in bf16 unless told otherwise; the FP32
    IR itself keeps its ops in f32 and records the hint, so plain compile_model gives FP32 results."""
    import openvino as ov

    # Conv nets only: OpenVINO 2026.4 drops the marker when it turns a MatMul fed by a Gather into a
    # FullyConnected (the tokens model), which then runs bf16 unless the consumer sets the f32 hint.
    for name in ("cnn", "multimodal"):
        case = cases[name]
        result = get_target("openvino").export(case.request(Precision.FP32, tmp_path / name))
        text = result.files[0].read_text()
        assert '<INFERENCE_PRECISION_HINT value="f32" />' in text
        compiled = ov.Core().compile_model(str(result.files[0]))  # no hints, default device config
        runtime = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                   for op in compiled.get_runtime_model().get_ops()}
        assert not {kind for kind, precision in runtime if precision in ("bf16", "f16")} & {"Convolution", "FullyConnected"}, runtime
        for feeds, reference in zip(case.validation, case.reference):
            got = compiled(feeds)[compiled.outputs[0]]
            np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * float(np.abs(reference).max()))


def test_calibration_methods_are_honoured_or_refused_in_one_line(cases, tmp_path):
    from edge_sdk.converters.targets.base import CalibrationMethod

    target = get_target("openvino")
    result = target.export(cases["cnn"].request(Precision.INT8, tmp_path / "p", calibration_method=CalibrationMethod.PERCENTILE))
    assert "NNCF INT8 (percentile)" in result.notes[0]
    assert "MEAN_QUANTILE" in result.files[0].read_text() or result.nodes_quantized > 0
    with pytest.raises(ConversionError, match=r"^openvino int8: NNCF has no entropy calibration; use --calibration-method minmax or percentile$"):
        target.export(cases["cnn"].request(Precision.INT8, tmp_path / "e", calibration_method=CalibrationMethod.ENTROPY))
    assert not (tmp_path / "e").exists()


def test_transformer_graphs_use_nncf_transformer_model_type():
    import onnx
    from onnx import helper

    from edge_sdk.converters.targets.openvino import is_transformer

    attention = helper.make_graph([helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"]),
                                   helper.make_node("MatMul", ["p", "v"], ["o"])], "attn", [], [])
    conv = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])] * 3 + [helper.make_node("MatMul", ["y", "z"], ["o"])],
                             "cnn", [], [])
    assert is_transformer(attention) and not is_transformer(conv)
    assert isinstance(attention, onnx.GraphProto)


def _recipe(name: str):
    return next(r for r in get_target("openvino").recipes(Precision.INT8) if r.name == name)


def _quantized_op_types(xml) -> set[str]:
    """The op types whose inputs a FakeQuantize feeds (directly or through a weight Convert)."""
    import openvino as ov

    fed = set()
    for op in ov.Core().read_model(str(xml)).get_ops():
        for source in (op.input_value(i).get_node() for i in range(op.get_input_size())):
            if source.get_type_name() == "Convert" and source.get_input_size():
                source = source.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                fed.add(op.get_type_name())
    return fed


def test_int8_falls_back_to_weighted_ops_then_to_accuracy_control():
    recipes = get_target("openvino").recipes(Precision.INT8)
    assert [r.name for r in recipes] == ["int8", "int8-conv-matmul", "nncf-accuracy-control"]
    assert [r.when.value for r in recipes] == ["always", "fallback", "fallback"]
    assert recipes[2].recovers_accuracy and recipes[2].needs_calibration


def test_the_conv_matmul_recipe_quantizes_only_weighted_ops(cases, tmp_path):
    import dataclasses

    case = cases["multimodal"]
    target = get_target("openvino")
    plain = target.export(case.request(Precision.INT8, tmp_path / "plain"))
    weighted = target.export(dataclasses.replace(case.request(Precision.INT8, tmp_path / "weighted"),
                                                 recipe=_recipe("int8-conv-matmul")))
    assert 0 < weighted.nodes_quantized < plain.nodes_quantized
    assert _quantized_op_types(plain.files[0]) - {"Convolution", "MatMul"}  # plain also quantizes Add, Concat...
    assert _quantized_op_types(weighted.files[0]) <= {"Convolution", "GroupConvolution", "MatMul"}


def test_accuracy_control_reverts_ops_until_the_gates_measure_is_met(cases, tmp_path):
    """NNCF's accuracy control asks the request's AccuracyCheck (the gate's measure) and reverts
    quantized ops to FP32 until it is within budget: here a budget only a near-exact model meets."""
    import dataclasses

    from edge_sdk.converters.targets.base import AccuracyCheck

    case = cases["cnn"]
    name = case.outputs[0].name
    asked: list[int] = []

    def drop(outputs) -> float:  # points: the worst relative error of the given samples' outputs
        asked.append(len(outputs))
        errors = [np.abs(out[name] - case.reference[i]).max() / np.abs(case.reference[i]).max() for i, out in outputs.items()]
        return 100.0 * max(errors, default=0.0)

    target = get_target("openvino")
    plain = target.export(case.request(Precision.INT8, tmp_path / "plain"))
    request = dataclasses.replace(case.request(Precision.INT8, tmp_path / "ac"), recipe=_recipe("nncf-accuracy-control"),
                                  accuracy=AccuracyCheck(case.validation, drop, max_drop=0.5,
                                                         reference=[{name: r} for r in case.reference]))
    controlled = target.export(request)
    assert max(asked) == len(case.validation)  # the whole validation set, through the check
    assert controlled.nodes_quantized < plain.nodes_quantized
    assert "accuracy control on 12 validation samples" in controlled.notes[0]
    session = get_backend("openvino").load(controlled.files, controlled.inputs, controlled.outputs,
                                           BackendOptions(precision=Precision.INT8))
    assert drop({i: session.run(f) for i, f in enumerate(case.validation)}) <= 0.5


def test_accuracy_control_without_validation_samples_is_one_line(cases, tmp_path):
    import dataclasses

    request = dataclasses.replace(cases["cnn"].request(Precision.INT8, tmp_path), recipe=_recipe("nncf-accuracy-control"))
    assert request.accuracy is None  # what the builder passes for a streamed --state
    with pytest.raises(ConversionError, match=r"^openvino: accuracy control needs validation samples"):
        get_target("openvino").export(request)
