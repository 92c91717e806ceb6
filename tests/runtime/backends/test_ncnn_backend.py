"""The ncnn backend on hand-written ncnn models (no converter needed) and its error paths."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from edge_sdk.errors import BackendError, InputError, MissingDependencyError
from edge_sdk.manifest import TensorSpec
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

pytestmark = pytest.mark.requires("ncnn")

# y = relu(x) * 2 - 1, elementwise; ncnn's text param format, no weights.
PARAM = """7767517
4 4
Input            in0      0 1 in0
ReLU             relu_0   1 1 in0 1
BinaryOp         mul_0    1 1 1 2 0=2 1=1 2=2.0
BinaryOp         sub_0    1 1 2 out0 0=1 1=1 2=1.0
"""


@pytest.fixture
def model(tmp_path):
    param, bin_ = tmp_path / "m.ncnn.param", tmp_path / "m.ncnn.bin"
    param.write_text(PARAM)
    bin_.write_bytes(b"")
    return [param, bin_]


def specs(shape):
    return ([TensorSpec(name="x", dtype="float32", shape=shape, artifact_name="in0")],
            [TensorSpec(name="y", dtype="float32", shape=shape, artifact_name="out0")])


@pytest.mark.parametrize("shape", [[1, 3, 4, 5], [1, 4, 40], [1, 6]])
def test_runs_every_rank_with_caller_names(model, shape):
    inputs, outputs = specs(shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with get_backend("ncnn").load(model, inputs, outputs, BackendOptions(threads=2)) as session:
        y = session.run({"x": x})["y"]
    assert y.shape == tuple(shape) and y.dtype == np.float32
    np.testing.assert_allclose(y, np.maximum(x, 0) * 2 - 1, rtol=1e-6, atol=1e-6)


def test_fp16_option_computes_close_to_fp32(model):
    inputs, outputs = specs([1, 3, 8, 8])
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    y16 = get_backend("ncnn").load(model, inputs, outputs, BackendOptions(precision=Precision.FP16)).run({"x": x})["y"]
    np.testing.assert_allclose(y16, np.maximum(x, 0) * 2 - 1, atol=1e-2)


def test_concurrent_runs_give_each_caller_its_own_result(model):
    inputs, outputs = specs([1, 16])
    session = get_backend("ncnn").load(model, inputs, outputs)
    errors = []

    def worker(seed):
        x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
        for _ in range(50):
            if not np.allclose(session.run({"x": x})["y"], np.maximum(x, 0) * 2 - 1, atol=1e-6):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_inputs_and_files(model, tmp_path):
    inputs, outputs = specs([1, 6])
    session = get_backend("ncnn").load(model, inputs, outputs)
    with pytest.raises(InputError, match="dtype"):
        session.run({"x": np.zeros((1, 6), np.float64)})
    with pytest.raises(BackendError, match="need a .param and a .bin"):
        get_backend("ncnn").load([model[0]], inputs, outputs)
    with pytest.raises(BackendError, match="does not exist"):
        get_backend("ncnn").load([tmp_path / "x.param", tmp_path / "x.bin"], inputs, outputs)
    bad = tmp_path / "bad.param"
    bad.write_text("this is not ncnn\n")
    with pytest.raises(BackendError, match="not a valid ncnn param"):
        get_backend("ncnn").load([bad, model[1]], inputs, outputs)
    wrong_blob = [TensorSpec(name="x", dtype="float32", shape=[1, 6], artifact_name="data")]
    with pytest.raises(BackendError, match="no input blob 'data'"):
        get_backend("ncnn").load(model, wrong_blob, outputs).run({"x": np.zeros((1, 6), np.float32)})


def test_missing_package_names_the_extra(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ncnn", None)
    with pytest.raises(MissingDependencyError, match=r"edge-sdk\[ncnn\]"):
        get_backend("ncnn").load(model, *specs([1, 6]))


def test_non_contiguous_inputs_are_read_correctly(model):
    """Regression: ncnn.Mat borrows numpy memory; a temporary contiguous copy must outlive it."""
    inputs, outputs = specs([1, 3, 64, 64])
    session = get_backend("ncnn").load(model, inputs, outputs)
    rng = np.random.default_rng(5)
    for _ in range(5):
        x = np.asfortranarray(rng.standard_normal((1, 3, 64, 64)).astype(np.float32))
        assert not x.flags.c_contiguous
        churn = [np.full(3 * 64 * 64, 1e30, np.float32) for _ in range(4)]  # reuse freed buffers
        y = session.run({"x": x})["y"]
        del churn
        np.testing.assert_allclose(y, np.maximum(x, 0) * 2 - 1, rtol=1e-6, atol=1e-6)


_RUN_AS = """
import sys, numpy as np
from edge_sdk.manifest import TensorSpec
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision
files, precision = sys.argv[1:3], Precision(sys.argv[3])
x = np.load(sys.argv[4])
inputs = [TensorSpec(name="x", dtype="float32", shape=list(x.shape), artifact_name="in0")]
outputs = [TensorSpec(name="y", dtype="float32", shape=[1, 64], artifact_name="out0")]
y = get_backend("ncnn").load(files, inputs, outputs, BackendOptions(threads=1, precision=precision)).run({"x": x})["y"]
np.save(sys.argv[5], y)
"""


def test_an_int8_file_runs_int8_whatever_precision_is_asked(tmp_path):
    """ncnn reads an INT8 layer's weights as float32 when INT8 inference is off: a segfault (seen on
    ocr-cls, loaded with the default precision). Run in a child process: a crash must fail the test, not end the run."""
    import subprocess

    from edge_sdk.converters.targets import ncnn_int8

    rng = np.random.default_rng(3)
    weights, bias = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    param, bin_ = tmp_path / "fc.ncnn.param", tmp_path / "fc.ncnn.bin"
    param.write_text("7767517\n2 2\nInput in0 0 1 in0\nInnerProduct fc 1 1 in0 out0 0=64 1=1 2=16384\n")
    bin_.write_bytes(b"\0\0\0\0" + weights.tobytes() + bias.tobytes())
    samples = [{"x": rng.standard_normal((1, 256)).astype(np.float32)} for _ in range(8)]
    quantized = ncnn_int8.quantize(param, bin_, samples, {"x": "in0"})
    param.write_text(quantized.param_text)
    bin_.write_bytes(quantized.weights)
    np.save(tmp_path / "x.npy", samples[0]["x"])
    results = {}
    for precision in ("int8", "fp32"):
        run = subprocess.run([sys.executable, "-c", _RUN_AS, str(param), str(bin_), precision, str(tmp_path / "x.npy"),
                              str(tmp_path / f"{precision}.npy")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (precision, run.returncode, run.stderr[-500:])
        results[precision] = np.load(tmp_path / f"{precision}.npy")
    np.testing.assert_array_equal(results["fp32"], results["int8"])
    reference = samples[0]["x"] @ weights.T + bias
    np.testing.assert_allclose(results["int8"], reference, atol=0.03 * np.abs(reference).max())  # INT8, not garbage
