"""NCNN export through the pnnx binary of the `ncnn` toolchain, run with the real ncnn package."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_sdk.converters.targets.base import get_target
from edge_sdk.converters.targets.ncnn import ncnn_int8_tools
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import TensorSpec
from edge_sdk.types import Precision

pytestmark = [pytest.mark.toolchain, pytest.mark.requires("ncnn")]


@pytest.fixture(autouse=True)
def _toolchain(require_toolchain):
    require_toolchain("ncnn")


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


@pytest.mark.skipif(ncnn_int8_tools() is not None, reason="not applicable here: ncnn2table/ncnn2int8 are installed")
def test_int8_without_ncnn_tools_says_why(cases, tmp_path, monkeypatch):
    target = get_target("ncnn")
    assert Precision.INT8 not in target.precisions()
    assert "ncnn2table" in target.unavailable_reason(Precision.INT8)
    with pytest.raises(ConversionError, match="ncnn int8 skipped: ncnn2table/ncnn2int8 are not on PATH"):
        target.export(cases["cnn"].request(Precision.INT8, tmp_path))
    assert not list(tmp_path.iterdir())


def test_configured_tool_dir_enables_int8(tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("ncnn2table", "ncnn2int8"):
        exe = tools / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    monkeypatch.setenv("EDGE_SDK_NCNN_TOOLS", str(tools))
    assert ncnn_int8_tools() == (tools / "ncnn2table", tools / "ncnn2int8")
    assert Precision.INT8 in get_target("ncnn").precisions()


def test_pnnx_failure_is_a_conversion_error_with_its_output(cases, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    request = replace(cases["cnn"].request(Precision.FP32, tmp_path / "out"), model_path=bad)
    with pytest.raises(ConversionError, match="ncnn: pnnx") as info:
        get_target("ncnn").export(request)
    assert "\n" in str(info.value)  # the tool's output tail is included
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dynamic_or_batched_inputs_are_refused_clearly(cases, tmp_path):
    case = cases["cnn"]
    dynamic = [TensorSpec(name="image", dtype="float32", shape=["N", 3, 32, 32])]
    with pytest.raises(ConversionError, match="dynamic shape"):
        get_target("ncnn").export(replace(case.request(Precision.FP32, tmp_path), inputs=dynamic))
    batched = [TensorSpec(name="image", dtype="float32", shape=[4, 3, 32, 32])]
    with pytest.raises(ConversionError, match="batch 1 only"):
        get_target("ncnn").export(replace(case.request(Precision.FP32, tmp_path), inputs=batched))


def test_session_rejects_batch_above_one(cases, tmp_path):
    from edge_sdk.errors import InputError
    from edge_sdk.runtime.backends.base import get_backend

    case = cases["cnn"]
    result = get_target("ncnn").export(case.request(Precision.FP32, tmp_path))
    session = get_backend("ncnn").load(result.files, result.inputs, result.outputs)
    with pytest.raises(InputError):
        session.run({"image": np.zeros((2, 3, 32, 32), np.float32)})
