"""The OpenVINO backend: real compiled models, concurrency, errors."""

from __future__ import annotations

import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest

from edge_sdk import samples
from edge_sdk.converters.targets.base import ExportRequest, get_target
from edge_sdk.errors import BackendError, MissingDependencyError
from edge_sdk.manifest import TensorSpec
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

pytestmark = pytest.mark.requires("openvino")

INPUTS = [TensorSpec(name="image", dtype="float32", shape=[1, 3, 32, 32])]
OUTPUTS = [TensorSpec(name="logits", dtype="float32", shape=[1, 10])]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov")
    model = samples.save(samples.make_cnn(), folder / "cnn.onnx")
    result = get_target("openvino").export(ExportRequest(model_path=model, precision=Precision.FP32, out_dir=folder,
                                                         variant_id="cnn", inputs=INPUTS, outputs=OUTPUTS))
    return model, result.files


def test_concurrent_runs_match_onnxruntime(ir):
    model, files = ir
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    session = get_backend("openvino").load(files, INPUTS, OUTPUTS, BackendOptions(threads=2))
    failures = []

    def worker(seed):
        x = np.random.default_rng(seed).random((1, 3, 32, 32), dtype=np.float32)
        want = ref.run(None, {"image": x})[0]
        for _ in range(20):
            got = session.run({"image": x})["logits"]
            if not np.allclose(got, want, atol=1e-4):
                failures.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_outputs_are_not_overwritten_by_the_next_run(ir):
    session = get_backend("openvino").load(ir[1], INPUTS, OUTPUTS)
    a = session.run({"image": np.zeros((1, 3, 32, 32), np.float32)})["logits"]
    kept = a.copy()
    session.run({"image": np.ones((1, 3, 32, 32), np.float32)})
    np.testing.assert_array_equal(a, kept)


def test_errors(ir, tmp_path):
    _, files = ir
    backend = get_backend("openvino")
    with pytest.raises(BackendError, match="no .xml file"):
        backend.load([files[1]], INPUTS, OUTPUTS)
    bad = tmp_path / "bad.xml"
    bad.write_text("<net>not really</net>")
    with pytest.raises(BackendError, match="openvino cannot load bad.xml"):
        backend.load([bad, tmp_path / "bad.bin"], INPUTS, OUTPUTS)
    with pytest.raises(BackendError, match="no output 'scores'"):
        backend.load(files, INPUTS, [TensorSpec(name="scores", dtype="float32", shape=[1, 10])])


def test_missing_package_names_the_extra(ir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match=r"edge-sdk\[openvino\]"):
        get_backend("openvino").load(ir[1], INPUTS, OUTPUTS)
