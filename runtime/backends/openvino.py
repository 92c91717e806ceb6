"""OpenVINO backend: compiled CPU model with thread count and an explicit precision hint.

On CPUs with bf16 support OpenVINO silently computes in bf16 unless ``INFERENCE_PRECISION_HINT``
says otherwise, so the hint always follows the variant's precision: ``f16`` for FP16 variants
where the CPU computes in FP16 natively, otherwise ``f32`` (INT8 layers run in INT8 regardless).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import BackendError, MissingDependencyError
from ...manifest import TensorSpec
from ...types import BackendName, MemoryMode, Precision
from .base import Backend, BackendOptions, Session, cpu_affinity


def import_openvino():
    """Import ``openvino`` with telemetry off (unless ``EDGE_SDK_OPENVINO_TELEMETRY=1``).

    Importing OpenVINO (and NNCF) instantiates ``openvino_telemetry``, which writes an id file to
    ``~/intel`` and sends events unless a consent file says no. Both fall back to their built-in
    stubs when that package cannot be imported, so blocking it in ``sys.modules`` opts out
    without writing anything.
    """
    if os.environ.get("EDGE_SDK_OPENVINO_TELEMETRY") != "1" and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # makes the import fail
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO target/backend") from None
    return ov


def precision_hint(core, precision: Precision, device: str = "CPU") -> str:
    """The INFERENCE_PRECISION_HINT that makes ``device`` compute as the variant was validated."""
    if precision is Precision.FP16:
        caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
        if "FP16" in caps:
            return "f16"
    return "f32"


class OpenVINOSession(Session):
    def __init__(self, compiled, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], hint: str) -> None:
        super().__init__(inputs, outputs)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: serialise callers
        self.precision_hint = hint
        self._ports = {}
        for spec in self.outputs:
            name = spec.artifact_name or spec.name
            try:
                self._ports[name] = compiled.output(name)
            except RuntimeError:
                raise BackendError(f"openvino: model has no output {name!r} "
                                   f"(outputs: {[sorted(o.get_names()) for o in compiled.outputs]})") from None

    def _run_native(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            try:
                result = self._request.infer(feeds)
            except RuntimeError as exc:
                raise BackendError(f"openvino failed to run: {str(exc).splitlines()[0]}") from None
            # Copy: the request reuses its output buffers on the next call.
            return {name: np.array(result[port], copy=True) for name, port in self._ports.items()}

    def close(self) -> None:
        self._request = None
        self._compiled = None


class OpenVINOBackend(Backend):
    name = BackendName.OPENVINO
    extra = "openvino"
    has_lean_mode = True

    def import_native(self) -> None:
        import_openvino()

    def load(self, files: Sequence[Path], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             options: BackendOptions = BackendOptions()) -> Session:
        ov = import_openvino()
        xml = next((Path(f) for f in files if Path(f).suffix == ".xml"), None)
        if xml is None:
            raise BackendError(f"openvino: no .xml file among {[str(f) for f in files]}")
        bin_ = next((Path(f) for f in files if Path(f).suffix == ".bin"), xml.with_suffix(".bin"))
        core = ov.Core()
        hint = precision_hint(core, options.precision)
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": hint}
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = int(options.threads)
        if options.threads == 1 and options.precision in (Precision.INT8, Precision.MIXED):
            # Measured on OpenVINO 2026.4 (x86, AVX2): an NNCF INT8 model whose FakeQuantize feeds a
            # Concat + MatMul returns all zeros with one inference thread unless the CPU plugin's
            # snippets (JIT-fused subgraphs) are off; 2+ threads are unaffected.
            config["SNIPPETS_MODE"] = "DISABLE"
        if options.memory is MemoryMode.LEAN:
            # The CPU plugin caches compiled kernels per input shape (default capacity 5000);
            # 0 turns that cache off. One stream keeps one set of intermediate buffers.
            config["CPU_RUNTIME_CACHE_CAPACITY"] = 0
            config["NUM_STREAMS"] = 1
        try:
            model = core.read_model(str(xml), str(bin_))
            with cpu_affinity(options.cpu_affinity):  # the CPU plugin's stream threads start here
                compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"openvino cannot load {xml.name}: {str(exc).strip().splitlines()[0]}") from None
        return OpenVINOSession(compiled, inputs, outputs, hint)
