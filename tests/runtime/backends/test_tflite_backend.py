"""The TFLite backend: LiteRT sessions on onnx2tf output, quantized I/O, errors."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
from needs import need_toolchain

from edge_sdk import samples
from edge_sdk.converters.targets.base import ExportRequest, get_target
from edge_sdk.errors import BackendError, MissingDependencyError
from edge_sdk.manifest import TensorSpec
from edge_sdk.runtime.backends import tflite as tflite_backend
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

pytestmark = pytest.mark.requires("ai_edge_litert")

INPUTS = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 32, 32])]
OUTPUTS = [TensorSpec(name="logits", dtype="float32", shape=[1, 10])]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    need_toolchain("tflite")
    folder = tmp_path_factory.mktemp("tfl")
    model = samples.save(samples.make_cnn(), folder / "cnn.onnx")
    result = get_target("tflite").export(ExportRequest(model_path=model, precision=Precision.FP32, out_dir=folder,
                                                       variant_id="cnn", inputs=INPUTS, outputs=OUTPUTS))
    return model, result


@pytest.mark.toolchain
def test_threads_and_layout(converted):
    model, result = converted
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)  # caller passes NCHW
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    for threads in (1, 2):
        session = get_backend("tflite").load(result.files, result.inputs, result.outputs, BackendOptions(threads=threads))
        np.testing.assert_allclose(session.run({"image": x})["logits"], want, atol=1e-4)
    # Without the recorded transpose the artifact would be fed NCHW data and refuse it.
    plain = [s.model_copy(update={"transpose": None}) for s in result.inputs]
    with pytest.raises(BackendError, match="tflite failed to run"):
        get_backend("tflite").load(result.files, plain, result.outputs).run({"image": x})


@pytest.mark.toolchain
def test_wrong_artifact_name_is_named(converted):
    _, result = converted
    wrong = [s.model_copy(update={"artifact_name": "input_1"}) for s in result.inputs]
    with pytest.raises(BackendError, match="no input 'input_1'"):
        get_backend("tflite").load(result.files, wrong, result.outputs)


def test_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendError, match="tflite cannot load bad.tflite"):
        get_backend("tflite").load([bad], INPUTS, OUTPUTS)
    with pytest.raises(BackendError, match="no .tflite file"):
        get_backend("tflite").load([tmp_path / "x.onnx"], INPUTS, OUTPUTS)


def test_quantized_io_round_trips():
    detail = {"dtype": np.int8, "quantization": (0.05, -3)}
    x = np.array([-6.5, -1.0, 0.0, 0.26, 6.4, 100.0], np.float32)
    q = tflite_backend._quantize(x, detail)
    assert q.dtype == np.int8 and q.tolist() == [-128, -23, -3, 2, 125, 127]
    back = tflite_backend._dequantize(q, detail)
    np.testing.assert_allclose(back[1:5], x[1:5], atol=0.025 + 1e-6)  # within half a step where not clipped


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(MissingDependencyError, match=r"edge-sdk\[tflite\]"):
        get_backend("tflite").load([tmp_path / "m.tflite"], INPUTS, OUTPUTS)
