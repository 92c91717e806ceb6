"""TFLite backend: LiteRT's interpreter (``ai-edge-litert``), falling back to ``tflite-runtime``.

Tensors are addressed by the artifact names the TFLite target recorded. Quantized I/O tensors
(int8/uint8 with a scale) are quantized on the way in and dequantized on the way out, so callers
always exchange float arrays.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import BackendError, MissingDependencyError
from ...manifest import TensorSpec
from ...types import BackendName, MemoryMode
from .base import Backend, BackendOptions, Session, cpu_affinity


def interpreter_class():
    """LiteRT's Interpreter, else tflite-runtime's; MissingDependencyError naming the extra."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # numpy<2 only (tflite-runtime 2.14)

        return Interpreter
    except ImportError:
        raise MissingDependencyError("ai-edge-litert", "tflite", "the TFLite backend") from None


class TFLiteSession(Session):
    def __init__(self, interpreter, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._it = interpreter
        self._lock = threading.Lock()  # an Interpreter holds one set of tensors: serialise callers
        by_name_in = {d["name"]: d for d in interpreter.get_input_details()}
        by_name_out = {d["name"]: d for d in interpreter.get_output_details()}
        self._in = {}
        for spec in self.inputs:
            name = spec.artifact_name or spec.name
            if name not in by_name_in:
                raise BackendError(f"tflite: the model has no input {name!r} (inputs: {sorted(by_name_in)})")
            self._in[name] = by_name_in[name]
        self._out = {}
        for spec in self.outputs:
            name = spec.artifact_name or spec.name
            if name not in by_name_out:
                raise BackendError(f"tflite: the model has no output {name!r} (outputs: {sorted(by_name_out)})")
            self._out[name] = by_name_out[name]

    def _run_native(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            try:
                for name, array in feeds.items():
                    detail = self._in[name]
                    self._it.set_tensor(detail["index"], _quantize(array, detail))
                self._it.invoke()
                return {name: _dequantize(self._it.get_tensor(d["index"]), d) for name, d in self._out.items()}
            except ValueError as exc:  # the interpreter reports shape/type problems as ValueError
                raise BackendError(f"tflite failed to run: {str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        self._it = None


def _quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype in (np.int8, np.uint8) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale + zero), info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.dtype(detail["dtype"]) in (np.int8, np.uint8) and scale:
        return ((array.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.array(array, copy=True)  # get_tensor's buffer is reused by the next invoke


def _builtin_without_delegates(interpreter_cls):
    """The ``OpResolverType`` member that turns XNNPACK off, from the interpreter's own module."""
    import sys

    resolver = getattr(sys.modules[interpreter_cls.__module__], "OpResolverType", None)
    if resolver is None:  # tflite-runtime builds without the enum cannot turn XNNPACK off
        raise BackendError("tflite: this interpreter cannot run without XNNPACK (no OpResolverType)")
    return resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES


class TFLiteBackend(Backend):
    name = BackendName.TFLITE
    extra = "tflite"
    has_lean_mode = True

    def import_native(self) -> None:
        interpreter_class()

    def load(self, files: Sequence[Path], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             options: BackendOptions = BackendOptions()) -> Session:
        Interpreter = interpreter_class()
        model = next((Path(f) for f in files if Path(f).suffix == ".tflite"), None)
        if model is None:
            raise BackendError(f"tflite: no .tflite file among {[str(f) for f in files]}")
        try:
            with cpu_affinity(options.cpu_affinity):  # XNNPACK's thread pool starts here
                kwargs = {}
                if options.memory is MemoryMode.LEAN:
                    # XNNPACK (the default delegate) repacks every weight into its own layout;
                    # the built-in kernels read the flatbuffer's weights in place.
                    kwargs["experimental_op_resolver_type"] = _builtin_without_delegates(Interpreter)
                it = Interpreter(model_path=str(model), num_threads=options.threads or None, **kwargs)
                it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            flex = sorted(set(re.findall(r"\((Flex\w+)\)", str(exc))))
            cause = (f"it uses TF Select ops ({', '.join(flex)}), which LiteRT does not include" if flex
                     else str(exc).strip().splitlines()[0])
            raise BackendError(f"tflite cannot load {model.name}: {cause}") from None
        return TFLiteSession(it, inputs, outputs)
