"""Memory footprint of a variant on its backend, measured in a fresh child process.

A session's RSS cannot be measured in a process that has loaded other sessions: the allocator
hands freed memory back out, so the second variant "costs" nothing. Each measurement therefore
runs in a new interpreter (``python -m edge_sdk.runtime.footprint``) that imports the backend's
native package, takes its RSS as the baseline, loads the variant (RSS added by loading), runs it a
few times on the self-test input and reads its own ``ru_maxrss`` (peak RSS above the baseline).
Each :class:`~edge_sdk.types.MemoryMode` the backend has is measured in its own child.

The converter writes the figures into each accepted variant's ``validation.footprint``; on the
device :class:`DeviceFigures` keeps the device's own figures in ``device-figures.json`` beside the
release (an unreadable file is ignored, reported, and measured again).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ..errors import BackendError
from ..manifest import Footprint, FootprintFigures, Variant, _Model, verify_file
from ..types import MemoryMode, Precision
from .monitor import MB

FIGURES_NAME = "device-figures.json"
DEFAULT_RUNS = 3
CHILD_TIMEOUT_S = 300.0


def machine_id(backend: str) -> str:
    """``x86_64 onnxruntime 1.23.2``: where figures were measured (arch and backend package version)."""
    from importlib import metadata

    package = {"tflite": "ai-edge-litert", "openvino": "openvino", "ncnn": "ncnn"}.get(backend, backend)
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "?"
    return f"{platform.machine()} {backend} {version}"


def _child_request(files: Sequence[Path], variant: Variant, mode: MemoryMode, inputs_path: Path | None,
                   threads: int | None, runs: int) -> dict[str, Any]:
    return {"backend": variant.backend, "files": [str(f) for f in files], "precision": variant.precision.value,
            "inputs": [s.model_dump(mode="json") for s in variant.inputs],
            "outputs": [s.model_dump(mode="json") for s in variant.outputs],
            "memory": mode.value, "feeds": str(inputs_path) if inputs_path else None, "threads": threads, "runs": runs}


class FootprintMeter:
    """Measures footprints in fresh processes forked from one clean measuring server.

    The server (``python -m edge_sdk.runtime.footprint``) imports the SDK and each backend's
    native package but never loads a model; every measurement is a child it forks, so each
    starts from the same untouched allocator at the price of a fork, not of a new interpreter.
    Use as a context manager (the server exits when its stdin closes).
    """

    def __init__(self, timeout_s: float = CHILD_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None

    def _server(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.runtime.footprint"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        return self._proc

    def _ask(self, request: dict[str, Any], what: str) -> dict[str, Any]:
        proc = self._server()
        assert proc.stdin is not None and proc.stdout is not None  # noqa: S101 - set by Popen above
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except OSError:
            raise BackendError(f"footprint of {what}: the measuring process is gone") from None
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(self.timeout_s):
                self.close()
                raise BackendError(f"footprint of {what}: no answer within {self.timeout_s:g} s")
        line = proc.stdout.readline()
        if not line:
            err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
            self.close()
            raise BackendError(f"footprint of {what}: the measuring process ended ({err[-1] if err else 'no output'})")
        return json.loads(line)

    def measure_files(self, files: Sequence[Path], variant: Variant, *, inputs_path: Path | None = None,
                      modes: Sequence[MemoryMode] | None = None, threads: int | None = None,
                      runs: int = DEFAULT_RUNS) -> Footprint:
        """Footprint of ``variant`` loaded from ``files``, one fresh child per memory mode.

        ``modes`` defaults to DEFAULT, plus LEAN where the backend has it. ``inputs_path`` is an
        ``.npz`` of feeds (the self-test input); without it the child runs zeros shaped like the
        signature. Raises :class:`BackendError` naming the variant when a measurement fails.
        """
        from .backends.base import get_backend

        backend = get_backend(variant.backend)
        if modes is None:
            modes = [MemoryMode.DEFAULT] + ([MemoryMode.LEAN] if backend.has_lean_mode else [])
        figures: dict[MemoryMode, FootprintFigures] = {}
        for mode in modes:
            what = f"{variant.id} ({mode})"
            result = self._ask(_child_request(files, variant, mode, inputs_path, threads, runs), what)
            if "error" in result:
                raise BackendError(f"footprint of {what} could not be measured: {result['error']}")
            figures[mode] = FootprintFigures(load_rss_mb=result["load_rss_mb"], peak_rss_mb=result["peak_rss_mb"])
        if MemoryMode.DEFAULT not in figures:
            raise BackendError(f"footprint of {variant.id}: the default memory mode must be measured")
        return Footprint(backend=variant.backend, weights_bytes=sum(Path(f).stat().st_size for f in files),
                         default=figures[MemoryMode.DEFAULT], lean=figures.get(MemoryMode.LEAN),
                         machine=machine_id(variant.backend), runs=runs)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> FootprintMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_files(files: Sequence[Path], variant: Variant, **kwargs: Any) -> Footprint:
    """One variant's footprint with a meter of its own (see :meth:`FootprintMeter.measure_files`)."""
    with FootprintMeter() as meter:
        return meter.measure_files(files, variant, **kwargs)


def measure(release_dir: Path, variant: Variant, *, inputs_path: Path | None = None, threads: int | None = None,
            runs: int = DEFAULT_RUNS) -> Footprint:
    """Footprint of a release's variant (its files verified first)."""
    files = [verify_file(release_dir, entry) for entry in variant.files]
    return measure_files(files, variant, inputs_path=inputs_path, threads=threads, runs=runs)


# ---------------------------------------------------------------------------------------------
# Figures measured on the device, kept beside the release


class VariantFigures(_Model):
    """What the device measured for one variant: footprint and, once accepted, latency."""

    footprint: Footprint | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_ratio: float | None = None  # median paired ratio to the device's FP32
    latency_ratio_ci: tuple[float, float] | None = None
    verdict: str | None = None  # ok / slower / inconclusive / over_memory / not_measured
    reason: str | None = None


class DeviceFigures(_Model):
    """``device-figures.json``: the device's own figures per variant id."""

    machine: str = ""
    measured: float = Field(default_factory=time.time)
    variants: dict[str, VariantFigures] = Field(default_factory=dict)

    @classmethod
    def read(cls, release_dir: Path) -> tuple[DeviceFigures | None, str | None]:
        """(figures, problem): ``(None, None)`` when there is no file; an unreadable or invalid one
        gives ``(None, why)`` — the caller reports it and measures again."""
        path = Path(release_dir) / FIGURES_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"{path}: cannot be read ({exc.strerror or exc}); measuring again"
        try:
            return cls.model_validate(json.loads(data)), None
        except (ValueError, ValidationError, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0]
            return None, f"{path}: not valid device figures ({first}); measuring again"

    def write(self, release_dir: Path) -> str | None:
        """Write atomically (temp file + fsync + rename); returns why it could not, else None."""
        release_dir = Path(release_dir)
        try:
            with tempfile.NamedTemporaryFile("wb", dir=release_dir, prefix=".device-figures-", delete=False) as handle:
                handle.write(self.model_dump_json(indent=2).encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, release_dir / FIGURES_NAME)
        except OSError as exc:
            try:
                os.unlink(handle.name)  # type: ignore[possibly-undefined]
            except (OSError, NameError):
                pass
            return f"{release_dir / FIGURES_NAME}: cannot be written ({exc.strerror or exc})"
        return None


# ---------------------------------------------------------------------------------------------
# The child process


def _zeros(specs: Sequence[dict[str, Any]]):
    import numpy as np

    return {s["name"]: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in s["shape"]], np.dtype(s["dtype"]))
            for s in specs}


def _rss_bytes() -> tuple[int, int | None]:
    """(VmRSS, VmHWM) of this process from /proc/self/status (bytes; HWM None if absent)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields.get("VmHWM")


def _child(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from ..manifest import TensorSpec
    from .backends.base import BackendOptions, get_backend

    backend = get_backend(request["backend"])
    inputs = [TensorSpec.model_validate(s) for s in request["inputs"]]
    outputs = [TensorSpec.model_validate(s) for s in request["outputs"]]
    if request["feeds"]:
        with np.load(request["feeds"], allow_pickle=False) as data:
            feeds = {k: data[k].astype(object) if data[k].dtype.kind == "U" else data[k] for k in data.files}
    else:
        feeds = _zeros(request["inputs"])
    options = BackendOptions(threads=request["threads"], precision=Precision(request["precision"]),
                             memory=MemoryMode(request["memory"]))
    baseline, _ = _rss_bytes()
    try:  # reset the peak-RSS mark to now (Linux >= 4.0), so the peak is this variant's own
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass
    session = backend.load([Path(f) for f in request["files"]], inputs, outputs, options)
    loaded, _ = _rss_bytes()
    for _ in range(max(int(request["runs"]), 1)):
        session.run(feeds)
    current, hwm = _rss_bytes()
    peak = max(hwm or 0, current, loaded)
    return {"load_rss_mb": round(max(loaded - baseline, 0) / MB, 2), "peak_rss_mb": round(max(peak - baseline, 0) / MB, 2)}


def _serve() -> None:
    """The measuring server: one JSON request a line on stdin; each measured in a forked child
    that writes one JSON line back. The server itself never loads a model."""
    import gc

    import numpy  # noqa: F401 - imported once here, inherited by every child

    from .backends.base import get_backend

    imported: set[str] = set()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            if request["backend"] not in imported:
                get_backend(request["backend"]).import_native()
                imported.add(request["backend"])
        except Exception as exc:  # e.g. MissingDependencyError: the answer says so
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            continue
        gc.collect()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer through the pipe, exit without cleanup
            os.close(read)
            try:
                result = _child(request)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            os.write(write, json.dumps(result).encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        if chunks:
            print(b"".join(chunks).decode(), flush=True)
        else:
            signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            why = f"killed by signal {signal} (out of memory?)" if signal else f"exit status {os.WEXITSTATUS(status)}"
            print(json.dumps({"error": f"the measuring child died: {why}"}), flush=True)


if __name__ == "__main__":
    _serve()
