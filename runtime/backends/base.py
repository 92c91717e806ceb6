"""The runtime backend protocol.

A :class:`Backend` loads an artifact's files into a :class:`Session`. Sessions speak the
*caller's* tensors: original ONNX names and layout. The base class validates inputs (names,
dtypes, shapes) before they reach native code and applies the manifest's renames and layout
transposes, so a backend only implements :meth:`Session._run_native` on artifact tensors.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from ...errors import InputError
from ...manifest import TensorSpec
from ...registry import Registry
from ...types import BackendName, MemoryMode, Precision


@dataclass(frozen=True)
class BackendOptions:
    threads: int | None = None
    # Pin the runtime's worker threads to these cores (big cores on big.LITTLE); see cpu_affinity().
    cpu_affinity: tuple[int, ...] | None = None
    precision: Precision = Precision.FP32  # what the variant computes in (OpenVINO's precision hint)
    memory: MemoryMode = MemoryMode.DEFAULT  # LEAN: the backend's memory-saving options, at some speed cost


class Session(ABC):
    """One loaded artifact. Thread-safe ``run`` unless a backend says otherwise."""

    #: The manifest variant this session serves, set by whoever loaded it (``EdgeModel``).
    variant_id: str | None = None

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.signature = list(inputs)  # as the caller sees it, constant inputs included
        self.inputs = [s for s in inputs if s.constant is None]  # what the artifact takes
        self.outputs = list(outputs)
        self._constants = {s.name: np.asarray(s.constant, np.dtype(s.dtype)) for s in inputs if s.constant is not None}
        self._inverse = {o.name: np.argsort(o.transpose) for o in self.outputs if o.transpose}
        # Per-call validation is on the hot path (a small model runs in ~100 us): precompute
        # what to compare, and fall back to check_inputs only to word an error.
        self._fast = [
            (s.name, s.artifact_name or s.name, np.dtype(s.dtype), len(s.shape),
             tuple((axis, d) for axis, d in enumerate(s.shape) if isinstance(d, int) and d >= 0), s.transpose)
            for s in self.inputs
        ]
        self._outputs_as_is = all(o.artifact_name in (None, o.name) and not o.transpose for o in self.outputs)

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if type(inputs) is dict and (len(inputs) == len(self._fast) or self._only_constants_extra(inputs)):
            feeds = {}
            for name, artifact_name, dtype, ndim, fixed, transpose in self._fast:
                array = inputs.get(name)
                if (type(array) is not np.ndarray or array.dtype != dtype or array.ndim != ndim
                        or any(array.shape[axis] != want for axis, want in fixed)):
                    break
                feeds[artifact_name] = np.ascontiguousarray(array.transpose(transpose)) if transpose else array
            else:
                return feeds
        feeds = {}
        for spec, array in zip(self.inputs, check_inputs(self.signature, inputs)):
            if spec.transpose:
                array = np.ascontiguousarray(array.transpose(spec.transpose))
            feeds[spec.artifact_name or spec.name] = array
        return feeds

    def _only_constants_extra(self, inputs: dict[str, np.ndarray]) -> bool:
        """The inputs beyond the artifact's are constant inputs, each with its value (the fast path's check)."""
        if not self._constants:
            return False
        extra = [name for name in inputs if name in self._constants]
        return len(inputs) - len(extra) == len(self._fast) and all(
            type(inputs[name]) is np.ndarray and np.array_equal(inputs[name], self._constants[name]) for name in extra)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on caller tensors (original names and layout); returns caller tensors."""
        raw = self._run_native(self._feeds(inputs))
        if self._outputs_as_is and len(raw) == len(self.outputs):
            return raw
        result = {}
        for spec in self.outputs:
            array = raw[spec.artifact_name or spec.name]
            if spec.transpose:
                array = array.transpose(spec.transpose)
            result[spec.name] = array
        return result

    @abstractmethod
    def _run_native(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on artifact tensors (artifact names and layout)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Backend(ABC):
    """Loads artifacts of one kind. Subclasses import their native package lazily in ``load``."""

    name: str
    extra: str  # the pip extra that installs the native package

    #: Whether :attr:`MemoryMode.LEAN` changes anything on this backend (else it is no ladder step).
    has_lean_mode: bool = False

    def import_native(self) -> None:  # noqa: B027 - optional hook
        """Import the native package now (a footprint measurement starts its baseline after this)."""

    @abstractmethod
    def load(self, files: Sequence[Path], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             options: BackendOptions = BackendOptions()) -> Session:
        """Load the artifact ``files`` (as listed in the manifest) into a ready session."""


def check_inputs(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Validate caller inputs against the signature; return the arrays the artifact takes, in signature order.

    A constant input (fixed at conversion) may be left out; given, it must hold its constant value.
    """
    if not isinstance(inputs, dict):
        raise InputError(f"inputs must be a dict of name -> numpy array, got {type(inputs).__name__}")
    expected = [s.name for s in specs]
    unknown = sorted(set(inputs) - set(expected))
    missing = [s.name for s in specs if s.name not in inputs and s.constant is None]
    if unknown or missing:
        raise InputError(f"input names {sorted(inputs)} do not match the model's {expected}"
                         + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else ""))
    arrays = []
    for spec in specs:
        if spec.constant is not None:
            _check_constant(spec, inputs.get(spec.name))
            continue
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InputError(f"input {spec.name!r}: expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r}: dtype {array.dtype} != expected {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise InputError(f"input {spec.name!r}: rank {array.ndim} (shape {list(array.shape)}) != expected rank {len(spec.shape)} {spec.shape}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise InputError(f"input {spec.name!r}: shape {list(array.shape)} != expected {spec.shape} (axis {axis})")
        arrays.append(array)
    return arrays


def _check_constant(spec: TensorSpec, given: object) -> None:
    if given is None:
        return
    value = np.asarray(spec.constant, np.dtype(spec.dtype))
    if not isinstance(given, np.ndarray) or given.shape != value.shape or not np.array_equal(given, value):
        got = given.tolist() if isinstance(given, np.ndarray) and given.size <= 8 else type(given).__name__
        raise InputError(f"input {spec.name!r} was fixed at {spec.constant} when the model was converted "
                         f"(--constant-input); got {got}: leave it out or pass that value")


def zero_feeds(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Zeros for every input the artifact takes (symbolic dims as 1): a smoke input where no sample exists."""
    return {s.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in s.shape], np.dtype(s.dtype))
            for s in specs if s.constant is None}


@contextmanager
def cpu_affinity(cores: tuple[int, ...] | None) -> Iterator[None]:
    """Pin the calling thread to ``cores`` for the block, then give it its previous mask back.

    Native runtimes start their worker threads while loading (onnxruntime's intra-op pool,
    OpenVINO's stream executors, XNNPACK's pool) and new threads inherit their creator's mask, so
    loading inside this block puts those workers on ``cores``. The loading thread itself - the
    app's main thread, or the monitor thread during a precision switch - must not stay pinned.
    Cores this process may not use are ignored; with none left (or no OS support) nothing changes.
    """
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    wanted = {c for c in cores if c in before}
    if not wanted or wanted == before:
        yield
        return
    os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


BACKENDS: Registry[type[Backend]] = Registry("backend")
BACKENDS.register_lazy(BackendName.ONNXRUNTIME.value, "edge_sdk.runtime.backends.onnxruntime:OnnxRuntimeBackend")
BACKENDS.register_lazy(BackendName.TFLITE.value, "edge_sdk.runtime.backends.tflite:TFLiteBackend")
BACKENDS.register_lazy(BackendName.OPENVINO.value, "edge_sdk.runtime.backends.openvino:OpenVINOBackend")
BACKENDS.register_lazy(BackendName.NCNN.value, "edge_sdk.runtime.backends.ncnn:NcnnBackend")


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``."""
    return BACKENDS.get(name)()
