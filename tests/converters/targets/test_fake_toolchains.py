"""Broken toolchains and converters that "succeed" without output, with fake executables in a
temporary toolchain root: each is a clear error from the target and a rejected row in a release."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

import edge_sdk
from edge_sdk.converters import toolchains
from edge_sdk.converters.loader import load_model
from edge_sdk.converters.targets.base import ExportRequest, get_target
from edge_sdk.errors import ConversionError, ToolchainError
from edge_sdk.types import Precision

# pnnx's output for a model with one input and one output (enough for the target to read blob names).
WRITES_PARAM = "printf '7767517\\n2 2\\nInput in0 0 1 in0\\nInnerProduct fc 1 1 in0 out0\\n' > model.ncnn.param\n" \
               "printf 'weights' > model.ncnn.bin\n"


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_toolchain(root: Path, name: str, body: str | None) -> None:
    """A toolchain whose marker says 'installed'; its program runs ``body`` (None: the program is missing)."""
    tc = toolchains.get_toolchain(name)
    (root / name).mkdir(parents=True)
    (root / name / toolchains.MARKER).write_text(json.dumps({"name": name, "pins": tc.pins, "versions": {}}))
    if body is not None:
        _script(root / name / tc.executable, body)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_SDK_TOOLCHAINS", str(tmp_path / "toolchains"))
    return tmp_path / "toolchains"


@pytest.fixture
def cnn_request(cnn_path, tmp_path):
    (tmp_path / "work").mkdir()
    loaded = load_model(cnn_path, tmp_path / "work")

    def make(precision: Precision, calibration=()) -> ExportRequest:
        return ExportRequest(model_path=loaded.path, precision=precision, out_dir=tmp_path / "out", variant_id="v",
                             inputs=loaded.inputs, outputs=loaded.outputs, calibration=calibration)

    return make


@pytest.mark.parametrize("name,program", [("tflite", "bin/onnx2tf"), ("ncnn", "pnnx/pnnx")])
def test_a_toolchain_without_its_program_is_broken_and_names_the_fix(root, name, program):
    _fake_toolchain(root, name, None)
    st = toolchains.status(name)
    assert not st.installed and st.detail.startswith("broken:") and st.detail.endswith(f"{program} is missing")
    with pytest.raises(ToolchainError, match=rf"is not usable \(broken: .*\): run `edge-sdk toolchain install {name}`"):
        get_target(name).check_available()


def test_onnx2tf_exiting_0_without_a_model_is_a_conversion_error(root, cnn_request):
    _fake_toolchain(root, "tflite", "echo converted; exit 0")
    with pytest.raises(ConversionError, match="^tflite: onnx2tf exited 0 but wrote no model_float32.tflite$") as info:
        get_target("tflite").export(cnn_request(Precision.FP32))
    assert "converted" in info.value.log  # the converter's own output, for report/<variant>.log
    assert not (cnn_request(Precision.FP32).out_dir / "v.tflite").exists()


def test_pnnx_exiting_0_without_a_model_is_a_conversion_error(root, cnn_request):
    _fake_toolchain(root, "ncnn", "exit 0")
    with pytest.raises(ConversionError, match=r"ncnn: pnnx exited 0 but wrote no .param/.bin"):
        get_target("ncnn").export(cnn_request(Precision.FP32))


def test_pnnx_crashing_is_one_line_naming_pnnx_with_its_log(root, cnn_request):
    _fake_toolchain(root, "ncnn", "echo 'pass_level2 Conv'; echo 'node Foo is unknown' >&2; kill -SEGV $$")
    with pytest.raises(ConversionError) as info:
        get_target("ncnn").export(cnn_request(Precision.FP32))
    assert str(info.value) == "ncnn: pnnx crashed (SIGSEGV)" and "\n" not in str(info.value)
    assert "pass_level2 Conv" in info.value.log and "node Foo is unknown" in info.value.log


def test_pnnx_failing_names_its_last_error_line(root, cnn_request):
    _fake_toolchain(root, "ncnn", "echo 'load onnx model failed: bad protobuf'; exit 3")
    with pytest.raises(ConversionError, match=r"^ncnn: pnnx failed \(exit 3\): load onnx model failed: bad protobuf$"):
        get_target("ncnn").export(cnn_request(Precision.FP32))


def test_broken_and_silent_converters_are_rejected_rows(root, cnn_path, tmp_path, assert_release_lists_every_file):
    _fake_toolchain(root, "tflite", None)  # broken
    _fake_toolchain(root, "ncnn", "exit 0")  # "succeeds", writes nothing
    out = tmp_path / "release"
    manifest = edge_sdk.convert(cnn_path, ["raspberry-pi-4"], out, latency_runs=2, max_accuracy_drop=100)
    for precision in ("fp32", "fp16", "int8"):
        tflite = manifest.variant(f"tflite-{precision}")
        assert tflite.status == "rejected" and "target unavailable: toolchain 'tflite'" in tflite.reason
        assert "broken: bin/onnx2tf is missing" in tflite.reason
    for precision in ("fp32", "fp16"):
        ncnn = manifest.variant(f"ncnn-{precision}")
        assert ncnn.status == "rejected" and ncnn.reason == "export failed: ncnn: pnnx exited 0 but wrote no .param/.bin"
    assert manifest.variant("ncnn-int8").reason == "export failed: ncnn int8 needs calibration data (activation ranges for ncnn's INT8 layers)"
    assert manifest.variant("onnx-fp32").ok and manifest.defaults["raspberry-pi-4"].startswith("onnx-")
    assert_release_lists_every_file(out)
