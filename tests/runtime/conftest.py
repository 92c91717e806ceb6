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
