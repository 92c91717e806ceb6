"""Fixtures of the runtime tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from edge_sdk.manifest import Variant
from edge_sdk.runtime.backends.base import Session
from edge_sdk.runtime.model import EdgeModel


class ServedBy:
    """Calls the real :meth:`EdgeModel.run` and says which variant served each call: every
    session's ``run`` notes its ``variant_id`` in the calling thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def note(self, session: Session) -> None:
        self._local.variant_id = session.variant_id

    def run(self, model: EdgeModel, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Variant]:
        self._local.variant_id = None
        outputs = model.run(inputs)
        return outputs, model.manifest.variant(self._local.variant_id)


@pytest.fixture
def served_by(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServedBy]:
    observer = ServedBy()
    real_run = Session.run

    def run(self: Session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = real_run(self, inputs)
        observer.note(self)
        return outputs

    monkeypatch.setattr(Session, "run", run)
    yield observer


@pytest.fixture(scope="session")
def mlp_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unsigned release of the ~98 MB generated MLP (intel-nuc; onnx and OpenVINO fp32/fp16/int8),
    with the converter's footprint figures. Built once: the footprint, ladder and acceptance tests
    share it (conversion ~20-40 s on 2 cores)."""
    import edge_sdk
    from edge_sdk import samples
    from needs import need_module

    need_module("openvino")
    folder = tmp_path_factory.mktemp("mlp")
    onnx_path = samples.save(samples.make_mlp(), folder / "mlp.onnx")
    out = folder / "release"
    edge_sdk.convert(onnx_path, ["intel-nuc"], out, calibration="random", targets=["onnx", "openvino"],
                     model_name="mlp", latency_runs=3, speed_gate=False, max_accuracy_drop=100.0, mixed_precision=False)
    return out


def missing_runtime(backend: str) -> str | None:
    """Why ``backend`` cannot be tested here (its package or converter toolchain is absent), else None."""
    import importlib.util

    from edge_sdk.converters import toolchains

    package, toolchain = {"onnxruntime": ("onnxruntime", None), "openvino": ("openvino", None),
                          "tflite": ("ai_edge_litert", "tflite"), "ncnn": ("ncnn", "ncnn")}[backend]
    if importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    if toolchain is not None and not toolchains.status(toolchain).installed:
        return f"the {toolchain} converter toolchain is not installed (edge-sdk toolchain install {toolchain})"
    return None


TARGET_OF = {"onnxruntime": "onnx", "openvino": "openvino", "tflite": "tflite", "ncnn": "ncnn"}


@pytest.fixture(scope="session")
def all_backends_release(tmp_path_factory, cnn_path: Path, cnn_calibration_dir: Path) -> Path:
    """The CNN for generic-x86_64 with every target whose package and toolchain are installed here
    (with the converter's footprint figures: the hot-swap and footprint tests share it)."""
    import edge_sdk

    targets = [TARGET_OF[b] for b in TARGET_OF if missing_runtime(b) is None]
    out = tmp_path_factory.mktemp("releases") / "cnn-all-backends"
    edge_sdk.convert(cnn_path, ["generic-x86_64"], out, calibration=cnn_calibration_dir, targets=targets,
                     max_accuracy_drop=20.0, model_name="cnn", latency_runs=5, speed_gate=False)
    return out
