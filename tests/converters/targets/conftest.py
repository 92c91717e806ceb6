"""Fixtures for the export-target tests: the sample models, their data and an FP32 reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_sdk import samples
from edge_sdk.converters.targets.base import ExportRequest, ExportResult
from edge_sdk.manifest import TensorSpec
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision


def _smooth_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    base = rng.random((1, 3, 4, 4)).astype(np.float32)
    noise = 0.05 * rng.standard_normal((1, 3, size, size)).astype(np.float32)
    return np.kron(base, np.ones((1, 1, size // 4, size // 4), np.float32)) + noise


def make_token_classifier(vocab: int = 64, tokens: int = 16, width: int = 24, classes: int = 6):
    """int32 token ids [1, tokens] -> embedding -> mean -> Gemm -> logits: an integer input, as in real text models."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    init = [numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "embedding"),
            numpy_helper.from_array(rng.standard_normal((width, classes)).astype(np.float32) * 0.3, "head_w"),
            numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "head_b")]
    nodes = [helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], name="embed"),
             helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             helper.make_node("Gemm", ["pooled", "head_w", "head_b"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("tokens", TensorProto.INT32, [1, tokens])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def make_stateful_lstm(features: int = 8, hidden: int = 16, head_bias: bool = False):
    """A streaming LSTM as silero-vad's decoder is: a frame [1, F] and a state [2, 1, H] (h and c
    stacked, no batch axis first) in; a score and the next state out."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    init = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32) * 0.3, "W"),
            numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.3, "R"),
            numpy_helper.from_array(rng.standard_normal((1, 8 * hidden)).astype(np.float32) * 0.1, "B"),
            numpy_helper.from_array(rng.standard_normal((hidden, 1)).astype(np.float32) * 0.3, "head"),
            numpy_helper.from_array(np.array([0], np.int64), "first"),
            numpy_helper.from_array(np.array([1], np.int64), "second")]
    nodes = [helper.make_node("Unsqueeze", ["frame", "first"], ["sequence"]),  # [1 step, 1 batch, F]
             helper.make_node("Gather", ["state", "first"], ["h0"], axis=0),
             helper.make_node("Gather", ["state", "second"], ["c0"], axis=0),
             helper.make_node("LSTM", ["sequence", "W", "R", "B", "", "h0", "c0"], ["", "h1", "c1"], hidden_size=hidden),
             helper.make_node("Concat", ["h1", "c1"], ["stateN"], axis=0),
             helper.make_node("Squeeze", ["h1", "first"], ["last"]),
             helper.make_node("MatMul", ["last", "head"], ["score"]) if not head_bias else
             helper.make_node("Gemm", ["last", "head", "head_bias"], ["score"])]  # a bias: needs its input's scale
    if head_bias:
        init.append(numpy_helper.from_array(np.array([0.1], np.float32), "head_bias"))
    graph = helper.make_graph(nodes, "stateful",
                              [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, features]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, hidden])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1]),
                               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, hidden])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if name == "stateful":
        return {"frame": rng.standard_normal((1, 8)).astype(np.float32),
                "state": rng.standard_normal((2, 1, 16)).astype(np.float32) * 0.5}
    if name == "tokens":
        return {"tokens": rng.integers(0, 64, (1, 16)).astype(np.int32)}
    if name == "cnn":
        return {"image": _smooth_image(rng)}
    return {"image": _smooth_image(rng), "audio": rng.standard_normal((1, 4, 40)).astype(np.float32),
            "imu": rng.standard_normal((1, 6)).astype(np.float32)}


@dataclass
class Case:
    """One sample model with calibration and validation feeds and its FP32 onnxruntime outputs."""

    name: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: list[dict[str, np.ndarray]]
    validation: list[dict[str, np.ndarray]]
    reference: list[np.ndarray]  # first output, per validation sample

    def request(self, precision: Precision, out_dir: Path, calibrated: bool = True, **kw) -> ExportRequest:
        return ExportRequest(model_path=self.path, precision=precision, out_dir=out_dir,
                             variant_id=f"{self.name}-{precision.value}", inputs=self.inputs, outputs=self.outputs,
                             calibration=self.calibration if calibrated else (), **kw)


def _case(name: str, folder: Path) -> Case:
    model = {"cnn": samples.make_cnn, "multimodal": samples.make_multimodal, "tokens": make_token_classifier,
             "stateful": make_stateful_lstm}[name]()
    path = samples.save(model, folder / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": "float32", "tensor(int32)": "int32"}
    inputs = [TensorSpec(name=i.name, dtype=dtypes[i.type], shape=list(i.shape)) for i in session.get_inputs()]
    outputs = [TensorSpec(name=o.name, dtype="float32", shape=list(o.shape)) for o in session.get_outputs()]
    calibration = [_feeds(name, np.random.default_rng(100 + i)) for i in range(16)]
    validation = [_feeds(name, np.random.default_rng(900 + i)) for i in range(12)]
    reference = [session.run(None, f)[0] for f in validation]
    return Case(name, path, inputs, outputs, calibration, validation, reference)


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("target-models")
    return {name: _case(name, folder) for name in ("cnn", "multimodal", "tokens", "stateful")}


@dataclass
class Parity:
    max_abs: float
    cosine: float
    top1: float
    scale: float  # max |reference|, to read max_abs relative to the outputs' size


def parity(case: Case, result: ExportResult, backend: str, precision: Precision, threads: int = 1) -> Parity:
    """Load ``result`` with its real backend, run every validation sample, compare with FP32 ONNX."""
    session = get_backend(backend).load(result.files, result.inputs, result.outputs,
                                        BackendOptions(threads=threads, precision=precision))
    got = []
    for feeds in case.validation:
        out = session.run(feeds)
        assert list(out) == [o.name for o in case.outputs]  # caller names come back
        got.append(out[case.outputs[0].name])
    session.close()
    ref, cand = np.stack(case.reference), np.stack(got)
    assert cand.shape == ref.shape and cand.dtype == np.float32
    flat_r, flat_c = ref.ravel().astype(np.float64), cand.ravel().astype(np.float64)
    cosine = float(flat_r @ flat_c / (np.linalg.norm(flat_r) * np.linalg.norm(flat_c)))
    top1 = float(np.mean(ref.reshape(len(ref), -1).argmax(1) == cand.reshape(len(cand), -1).argmax(1)))
    return Parity(float(np.abs(ref - cand).max()), cosine, top1, float(np.abs(ref).max()))


# Bounds every target must meet on the sample models (relative error = max_abs / max |reference|).
BOUNDS = {
    Precision.FP32: {"rel": 1e-4, "cosine": 0.99999, "top1": 1.0},
    Precision.FP16: {"rel": 5e-3, "cosine": 0.9999, "top1": 0.9},  # random-weight logits have near-ties
    Precision.INT8: {"rel": 0.35, "cosine": 0.98, "top1": 0.75},  # worst seen: 0.29 (tflite, multimodal)
}


def check_bounds(p: Parity, precision: Precision) -> None:
    b = BOUNDS[precision]
    assert p.max_abs / p.scale <= b["rel"], p
    assert p.cosine >= b["cosine"], p
    assert p.top1 >= b["top1"], p


@pytest.fixture(scope="session")
def parity_check():
    """``parity_check(case, result, backend, precision)`` -> Parity, asserting the precision's bounds."""

    def check(case: Case, result: ExportResult, backend: str, precision: Precision, threads: int = 1) -> Parity:
        p = parity(case, result, backend, precision, threads)
        check_bounds(p, precision)
        return p

    return check
