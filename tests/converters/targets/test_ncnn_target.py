"""NCNN export through the pnnx binary of the `ncnn` toolchain, run with the real ncnn package."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from needs import need_toolchain

from edge_sdk.converters.targets import ncnn_int8
from edge_sdk.converters.targets.base import CalibrationMethod, get_target
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import TensorSpec
from edge_sdk.types import Precision

pytestmark = [pytest.mark.toolchain, pytest.mark.requires("ncnn")]


@pytest.fixture(autouse=True)
def _toolchain():
    need_toolchain("ncnn")


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.FP16], ids=str)
@pytest.mark.parametrize("model", ["cnn", "multimodal"])
def test_export_and_run_matches_fp32_onnx(cases, parity_check, tmp_path, model, precision):
    case = cases[model]
    result = get_target("ncnn").export(case.request(precision, tmp_path))
    assert [f.name for f in result.files] == [f"{model}-{precision.value}.ncnn.param", f"{model}-{precision.value}.ncnn.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in result.files)  # no pnnx side files
    # pnnx renames blobs in0.. / out0.. in the model's order; the caller keeps the ONNX names.
    assert [(s.name, s.artifact_name) for s in result.inputs] == [(s.name, f"in{i}") for i, s in enumerate(case.inputs)]
    assert [(s.name, s.artifact_name) for s in result.outputs] == [(s.name, f"out{i}") for i, s in enumerate(case.outputs)]
    assert all(s.transpose is None for s in result.inputs)
    parity_check(case, result, "ncnn", precision)


def test_fp16_halves_the_weights(cases, tmp_path):
    sizes = {p: get_target("ncnn").export(cases["cnn"].request(p, tmp_path)).files[1].stat().st_size
             for p in (Precision.FP32, Precision.FP16)}
    assert sizes[Precision.FP16] < 0.55 * sizes[Precision.FP32]


@pytest.mark.parametrize("model", ["cnn", "multimodal"])
def test_int8_is_ncnn_int8_layers_that_run_close_to_fp32(cases, parity_check, tmp_path, model):
    case = cases[model]
    fp32 = get_target("ncnn").export(case.request(Precision.FP32, tmp_path / "fp32"))
    int8 = get_target("ncnn").export(case.request(Precision.INT8, tmp_path / "int8"))
    _, layers = ncnn_int8.parse_param(int8.files[0].read_text())
    quantizable = [layer for layer in layers if layer.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct")]
    assert quantizable and int8.nodes_quantized == len(quantizable)
    assert all(layer.params["8"] == "2" for layer in quantizable)  # per-channel weight scales + an input scale
    # INT8 weights: a quarter of the float weights plus a few scales.
    assert int8.files[1].stat().st_size < 0.3 * fp32.files[1].stat().st_size
    parity_check(case, int8, "ncnn", Precision.INT8)


@pytest.mark.parametrize("method", list(CalibrationMethod), ids=str)
def test_each_calibration_method_sets_the_input_scales(cases, tmp_path, method):
    case = cases["cnn"]
    result = get_target("ncnn").export(case.request(Precision.INT8, tmp_path, calibration_method=method))
    assert f"ncnn int8 ({method.value})" in result.notes[0]
    first_conv = next(layer for layer in ncnn_int8.parse_param(result.files[0].read_text())[1] if layer.type == "Convolution")
    located = next(b for b in ncnn_int8.layer_bytes(result.files[0], result.files[1].read_bytes()) if b.name == first_conv.name)
    input_scale = np.frombuffer(result.files[1].read_bytes(), np.float32, 1, located.end - 4)[0]
    absmax = max(float(np.abs(f["image"]).max()) for f in case.calibration)  # the first conv reads the input
    if method is CalibrationMethod.MINMAX:
        assert input_scale == pytest.approx(127 / absmax, rel=1e-6)
    else:  # clipping outliers: a larger scale than minmax, but never absurdly so
        assert 127 / absmax < input_scale < 20 * 127 / absmax


def test_entropy_threshold_clips_a_long_tail_and_keeps_a_uniform_range():
    uniform = np.full(ncnn_int8.HISTOGRAM_BINS, 100)
    assert ncnn_int8.entropy_threshold_bin(uniform) >= 0.95 * ncnn_int8.HISTOGRAM_BINS
    # Activations decaying fast from 0 plus one far outlier: the outlier is clipped, the bulk kept.
    decaying = (1e6 * np.exp(-np.arange(ncnn_int8.HISTOGRAM_BINS) / 40)).astype(np.int64)
    decaying[-1] = 1
    assert 150 <= ncnn_int8.entropy_threshold_bin(decaying) <= 1000


def test_exact_zeros_stay_out_of_the_kl_histogram_but_count_for_percentiles():
    """A ReLU's output is mostly exact zeros: counted into bin 0 they made the KL search clip
    CenterFace's activations at an eighth of their range (F1 -99 points)."""
    rng = np.random.default_rng(0)
    bulk = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    relu = np.concatenate([np.zeros(600_000, np.float32), bulk])
    plain, with_zeros = ncnn_int8.BlobStats(absmax=float(bulk.max())), ncnn_int8.BlobStats(absmax=float(bulk.max()))
    plain.add_to_histogram(bulk)
    with_zeros.add_to_histogram(relu)
    assert with_zeros.zeros == 600_000 and np.array_equal(with_zeros.histogram, plain.histogram)
    kl = CalibrationMethod.ENTROPY
    assert with_zeros.threshold(kl) == plain.threshold(kl) and plain.threshold(kl) > 2.5  # 2.5 sigma and more kept
    percentile = CalibrationMethod.PERCENTILE
    assert with_zeros.threshold(percentile) < plain.threshold(percentile)  # the same share of more values


def test_end_layers_are_those_reading_inputs_and_the_heads(cases, tmp_path):
    result = get_target("ncnn").export(cases["multimodal"].request(Precision.FP32, tmp_path))
    _, layers = ncnn_int8.parse_param(result.files[0].read_text())
    quantizable = [layer.name for layer in layers if layer.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct")]
    ends = ncnn_int8.end_layers(result.files[0].read_text())
    inputs = {top for layer in layers if layer.type == "Input" for top in layer.tops}
    readers = {layer.name for layer in layers if layer.name in quantizable and set(layer.bottoms) & inputs}
    assert readers and readers <= set(ends) and quantizable[-1] in ends and len(ends) < len(quantizable)


def test_int8_recipes_try_each_range_method_and_keep_ends_as_a_fallback(cases, parity_check, tmp_path):
    target = get_target("ncnn")
    recipes = {r.name: r for r in target.recipes(Precision.INT8)}
    assert list(recipes) == ["int8", "int8-percentile", "int8-kl", "int8-keep-ends"]
    result = target.export(cases["cnn"].request(Precision.INT8, tmp_path, recipe=recipes["int8-keep-ends"]))
    kept = ncnn_int8.end_layers(get_target("ncnn").export(cases["cnn"].request(Precision.FP32, tmp_path / "f")).files[0].read_text())
    assert "ncnn int8 (percentile)" in result.notes[0] and any(", ".join(kept) in n for n in result.notes)
    _, layers = ncnn_int8.parse_param(result.files[0].read_text())
    assert {layer.name for layer in layers if layer.params.get("8")} .isdisjoint(kept)
    assert result.nodes_quantized == sum(layer.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct")
                                         for layer in layers) - len(kept)
    parity_check(cases["cnn"], result, "ncnn", Precision.INT8)


def test_layer_bytes_are_where_ncnn_reads_each_layer(cases, tmp_path):
    result = get_target("ncnn").export(cases["cnn"].request(Precision.FP32, tmp_path))
    weights = result.files[1].read_bytes()
    layers = ncnn_int8.layer_bytes(result.files[0], weights)
    assert layers[-1].end == len(weights) and all(a.end == b.start for a, b in zip(layers, layers[1:]))
    with_weights = [layer for layer in layers if layer.reads]
    assert {layer.type for layer in with_weights} == {"Convolution", "InnerProduct"} and len(with_weights) == 6
    for layer in with_weights:  # a float32 type tag, the weights, the bias
        assert weights[layer.start:layer.start + 4] == b"\0\0\0\0" and len(layer.reads) == 3


def test_int8_without_calibration_says_why(cases, tmp_path):
    with pytest.raises(ConversionError, match="^ncnn int8 needs calibration data"):
        get_target("ncnn").export(cases["cnn"].request(Precision.INT8, tmp_path, calibrated=False))
    assert not list(tmp_path.iterdir())


def test_pnnx_failure_is_a_conversion_error_with_its_output(cases, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    request = replace(cases["cnn"].request(Precision.FP32, tmp_path / "out"), model_path=bad)
    with pytest.raises(ConversionError, match=r"^ncnn: pnnx failed \(exit \d+\)") as info:
        get_target("ncnn").export(request)
    assert "\n" not in str(info.value) and info.value.log  # one line; the tool's whole output beside it
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dynamic_or_batched_inputs_are_refused_clearly(cases, tmp_path):
    case = cases["cnn"]
    dynamic = [TensorSpec(name="image", dtype="float32", shape=["N", 3, 32, 32])]
    with pytest.raises(ConversionError, match="dynamic shape"):
        get_target("ncnn").export(replace(case.request(Precision.FP32, tmp_path), inputs=dynamic))
    batched = [TensorSpec(name="image", dtype="float32", shape=[4, 3, 32, 32])]
    with pytest.raises(ConversionError, match=r"first axis as the batch axis, which ncnn drops, so it must be 1 \(here 4\)"):
        get_target("ncnn").export(replace(case.request(Precision.FP32, tmp_path), inputs=batched))
    state = [TensorSpec(name="state", dtype="float32", shape=[2, 1, 128])]  # [layers, batch, hidden]
    with pytest.raises(ConversionError) as info:
        get_target("ncnn").export(replace(case.request(Precision.FP32, tmp_path), inputs=state))
    assert "has batch" not in str(info.value) and "'state' has shape [2, 1, 128]" in str(info.value)


def test_session_rejects_batch_above_one(cases, tmp_path):
    from edge_sdk.errors import InputError
    from edge_sdk.runtime.backends.base import get_backend

    case = cases["cnn"]
    result = get_target("ncnn").export(case.request(Precision.FP32, tmp_path))
    session = get_backend("ncnn").load(result.files, result.inputs, result.outputs)
    with pytest.raises(InputError):
        session.run({"image": np.zeros((2, 3, 32, 32), np.float32)})
