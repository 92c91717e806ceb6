"""onnxruntime backend (the core dependency: always available)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import BackendError
from ...manifest import TensorSpec
from ...types import BackendName, MemoryMode
from .base import Backend, BackendOptions, Session, cpu_affinity


class OnnxRuntimeSession(Session):
    def __init__(self, session, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._session = session
        self._output_names = [o.artifact_name or o.name for o in self.outputs]

    def _run_native(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(self._output_names, feeds)
        except Exception as exc:
            # Imported here, not per call: the import statement alone costs ~1 us per run.
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

            if isinstance(exc, (Fail, InvalidArgument, RuntimeException)):
                raise BackendError(f"onnxruntime failed to run: {exc}") from None
            raise
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    name = BackendName.ONNXRUNTIME
    extra = "core"
    has_lean_mode = True

    def import_native(self) -> None:
        import onnxruntime  # noqa: F401

    def load(self, files: Sequence[Path], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             options: BackendOptions = BackendOptions()) -> Session:
        import onnxruntime as ort

        model = next((f for f in files if Path(f).suffix == ".onnx"), None)
        if model is None:
            raise BackendError(f"onnxruntime: no .onnx file among {[str(f) for f in files]}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Idle intra-op threads spin-wait by default: on a device with few, shared cores that
        # burns a core between calls and takes it from the caller (measured on 2 cores: CPU per
        # call 4.5 -> 2.3 ms, p50 10.4 -> 6.6 ms in-process; in the daemon, 12 -> 5 ms CPU).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if options.memory is MemoryMode.LEAN:
            # Pre-packing keeps a second, GEMM-friendly copy of every MatMul/Conv weight (the
            # original initializer stays too); the arena keeps freed activations for reuse and
            # the memory pattern pre-plans one block for all of them. Off: less RSS, slower calls.
            # Keys from onnxruntime_session_options_config_keys.h.
            so.add_session_config_entry("session.disable_prepacking", "1")
            so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
            so.enable_cpu_mem_arena = False
            so.enable_mem_pattern = False
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        try:
            with cpu_affinity(options.cpu_affinity):  # the intra-op pool starts here
                session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several pybind types for corrupt models
            raise BackendError(f"onnxruntime cannot load {Path(model).name}: {str(exc).splitlines()[0]}") from None
        return OnnxRuntimeSession(session, inputs, outputs)
