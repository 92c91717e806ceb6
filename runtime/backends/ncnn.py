"""NCNN backend: ``ncnn.Net`` with explicit thread count and FP16/INT8 switches.

NCNN Mats have no batch axis (CHW / HW / W), so the session drops the caller's leading batch-1
axis on the way in and restores it on the way out. FP16 storage/arithmetic is switched on only for
FP16 variants: NCNN enables it by default on ARM CPUs that have it, which would make an FP32
variant compute differently from what was validated.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import BackendError, InputError, MissingDependencyError
from ...manifest import TensorSpec
from ...types import BackendName, MemoryMode, Precision
from .base import Backend, BackendOptions, Session


class NcnnSession(Session):
    def __init__(self, net, ncnn_module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        super().__init__(inputs, outputs)
        self._net = net
        self._ncnn = ncnn_module
        self._ranks = {o.artifact_name or o.name: len(o.shape) for o in self.outputs}
        self._lock = threading.Lock()

    def _run_native(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {}
        with self._lock:  # an ncnn.Net is not documented as safe for concurrent extractors
            ex = self._net.create_extractor()
            try:
                for name, array in feeds.items():
                    if array.ndim == 0 or array.shape[0] != 1:
                        raise InputError(f"ncnn: input {name!r} must have batch 1, got shape {list(array.shape)}")
                    # ncnn.Mat(ndarray) borrows the array's memory without keeping it alive, so the
                    # contiguous copy must outlive the Mat; clone() then gives ncnn its own refcounted
                    # buffer (in light mode, a first layer working in place on borrowed memory segfaults).
                    data = np.ascontiguousarray(array[0], dtype=np.float32)
                    mat = self._ncnn.Mat(data).clone()
                    del data
                    if ex.input(name, mat) != 0:
                        raise BackendError(f"ncnn: the model has no input blob {name!r}")
                for name, rank in self._ranks.items():
                    status, mat = ex.extract(name)
                    if status != 0:
                        raise BackendError(f"ncnn: extracting {name!r} failed (status {status})")
                    out = np.array(mat, copy=True)
                    # ncnn squeezes unit axes; restore the caller's rank with leading unit axes.
                    while out.ndim < rank:
                        out = out[np.newaxis]
                    result[name] = out
            finally:
                ex.clear()
        return result

    def close(self) -> None:
        if self._net is not None:
            self._net.clear()
        self._net = None


class NcnnBackend(Backend):
    name = BackendName.NCNN
    extra = "ncnn"
    has_lean_mode = True

    def import_native(self) -> None:
        try:
            import ncnn  # noqa: F401
        except ImportError:
            raise MissingDependencyError("ncnn", self.extra, "the NCNN backend") from None

    def load(self, files: Sequence[Path], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             options: BackendOptions = BackendOptions()) -> Session:
        try:
            import ncnn
        except ImportError:
            raise MissingDependencyError("ncnn", self.extra, "the NCNN backend") from None
        param = next((Path(f) for f in files if Path(f).suffix == ".param"), None)
        bin_ = next((Path(f) for f in files if Path(f).suffix == ".bin"), None)
        if param is None or bin_ is None:
            raise BackendError(f"ncnn: need a .param and a .bin file, got {[str(f) for f in files]}")
        for f in (param, bin_):
            if not f.is_file():
                raise BackendError(f"ncnn: {f} does not exist")
        net = ncnn.Net()
        fp16 = options.precision is Precision.FP16
        net.opt.use_fp16_packed = fp16
        net.opt.use_fp16_storage = fp16
        net.opt.use_fp16_arithmetic = fp16
        # Always on (ncnn's default): ncnn computes INT8 only in layers whose weights are INT8, and
        # with it off such a layer reads its INT8 weights as float32, past the end of the buffer (a
        # segfault on ocr-cls when an INT8 file was loaded without precision=int8).
        net.opt.use_int8_inference = True
        net.opt.use_vulkan_compute = False
        if options.memory is MemoryMode.LEAN:
            # Winograd and sgemm convolutions keep transformed copies of the kernels: off, the
            # direct kernels read the weights as loaded.
            net.opt.use_winograd_convolution = False
            net.opt.use_sgemm_convolution = False
        if options.threads:
            net.opt.num_threads = int(options.threads)
        # options.cpu_affinity is not applied: ncnn starts no threads while loading (its OpenMP
        # team belongs to whichever thread calls run), and its own pinning (set_cpu_powersave)
        # would pin that calling thread for good. ncnn workers follow their caller's mask.
        if net.load_param(str(param)) != 0:
            raise BackendError(f"ncnn cannot load {param.name}: not a valid ncnn param file")
        if net.load_model(str(bin_)) != 0:
            raise BackendError(f"ncnn cannot load {bin_.name}: weights do not match {param.name}")
        return NcnnSession(net, ncnn, inputs, outputs)
