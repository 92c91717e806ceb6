"""Managed, isolated converter toolchains.

Some converters cannot share the SDK's environment: onnx2tf pins numpy 1.26, onnx 1.19,
onnxruntime 1.23 and TensorFlow 2.19, and pnnx's PyPI package pulls torch unless installed with
``--no-deps``. Each such toolchain gets its own virtual environment under the user cache
directory (``platformdirs.user_cache_dir("edge-sdk")/toolchains/<name>``, or ``$EDGE_SDK_TOOLCHAINS``),
installed with pip's normal client from exact pins, and is only ever run as a subprocess with a
timeout. A toolchain counts as installed only once its marker file (written last, with the
versions pip actually installed) exists and matches the current pins, so a half-finished
install is never used.

OpenVINO + NNCF work with numpy 2 and our onnx/onnxruntime, so they live in the main
environment (extra ``openvino``); their "toolchain" is in-process and only checks/installs that extra.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import ConfigError, ToolchainError

MARKER = "edge-sdk-toolchain.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # onnx2tf colours its log lines
# Lines that read like errors on every machine without a GPU (TensorFlow's CUDA probe at start-up):
# never the cause of a failure.
_NOISE = re.compile(r"cuInit|cuda_(platform|executor|driver)|Unable to register cu(DNN|FFT|BLAS)")
TAIL_LINES = 25
# Any URL a converter tries to fetch goes to a closed local port, so a conversion fails fast
# instead of touching (or hanging on) the network.
_NO_NETWORK_PROXY = "http://127.0.0.1:9"


class ToolchainKind(str, Enum):
    VENV = "venv"  # own virtual environment, run as a subprocess
    IN_PROCESS = "in-process"  # packages in the SDK's own environment (an extra)


@dataclass(frozen=True)
class Toolchain:
    """One converter toolchain: what to install (exact pins) and what to run."""

    name: str
    kind: ToolchainKind
    purpose: str
    packages: tuple[str, ...] = ()  # installed with their dependencies (exact pins)
    no_deps: tuple[str, ...] = ()  # installed with --no-deps (pnnx: its binary needs no torch)
    constraints: tuple[str, ...] = ()  # the full lock (pip -c): transitive deps pinned too
    executable: str = ""  # path relative to the venv root of the program run by `run`
    extra: str = ""  # for in-process toolchains: the pip extra that provides them
    report: tuple[str, ...] = ()  # distributions whose installed versions `list` shows

    @property
    def pins(self) -> list[str]:
        return [*self.packages, *self.no_deps, *self.constraints]


_PY = f"python{sys.version_info.major}.{sys.version_info.minor}"

# `pip freeze` of a working onnx2tf toolchain (Python 3.11, x86_64/aarch64 wheels): every transitive
# dependency pinned, so a fresh machine installs exactly what was tested.
_TFLITE_LOCK = (
    "absl-py==2.5.1", "ai-edge-litert==2.1.0", "astunparse==1.6.3", "backports.strenum==1.2.8",
    "certifi==2026.10.18", "charset-normalizer==3.5.2", "coloredlogs==15.0.1",
    "flatbuffers==25.12.19", "gast==0.7.0", "google-pasta==0.2.0", "grpcio==1.85.1", "h5py==3.11.0",
    "humanfriendly==10.0", "idna==3.20", "json2onnx==2.0.3", "keras==3.15.1", "libclang==18.1.1",
    "Markdown==3.11.3", "markdown-it-py==4.3.0", "MarkupSafe==3.0.4", "mdurl==0.1.2",
    "ml_dtypes==0.5.1", "mpmath==1.3.0", "namex==0.1.0", "numpy==1.26.4", "onnx==1.19.1",
    "onnx2json==2.0.4", "onnx2tf==1.29.24", "onnx_graphsurgeon==0.5.8", "onnxoptimizer==0.4.2",
    "onnxruntime==1.23.0", "onnxsim==0.4.36", "opencv-python==4.11.0.86", "opt_einsum==3.4.0",
    "optree==0.20.0", "packaging==26.3", "protobuf==4.25.5", "psutil==5.9.5", "Pygments==2.21.0",
    "requests==2.32.5", "rich==15.0.0", "sam4onnx==2.0.0", "sbi4onnx==1.0.7", "scc4onnx==1.0.7",
    "scs4onnx==1.0.18", "sde4onnx==1.0.0", "sed4onnx==1.0.5",
    "simple_onnx_processing_tools==1.1.32", "sio4onnx==1.0.3", "sit4onnx==1.0.10", "six==1.17.0",
    "sna4onnx==1.0.6", "snc4onnx==1.0.14", "snd4onnx==1.1.7", "sne4onnx==2.0.1", "sng4onnx==2.0.1",
    "soa4onnx==1.0.5", "soc4onnx==1.0.2", "sod4onnx==1.0.0", "sog4onnx==1.0.17", "sor4onnx==1.0.7",
    "spo4onnx==1.0.5", "ssc4onnx==1.0.8", "ssi4onnx==1.0.4", "svs4onnx==1.0.0", "sympy==1.14.0",
    "tensorboard==2.19.0", "tensorboard-data-server==0.7.2", "tensorflow==2.19.0",
    "tensorflow-io-gcs-filesystem==0.37.1", "termcolor==3.3.0", "tf_keras==2.19.0", "tqdm==4.70.1",
    "typing_extensions==4.16.0", "urllib3==2.8.0", "Werkzeug==3.1.9", "wrapt==2.5.2",
)

TOOLCHAINS: dict[str, Toolchain] = {
    "tflite": Toolchain(
        name="tflite",
        kind=ToolchainKind.VENV,
        purpose="ONNX -> TFLite (onnx2tf + TensorFlow)",
        # onnx2tf 1.29.24 itself pins numpy 1.26.4, onnx 1.19.1, onnxruntime 1.23.0, tensorflow 2.19.0.
        packages=("onnx2tf==1.29.24",),
        constraints=_TFLITE_LOCK,
        executable="bin/onnx2tf",
        report=("onnx2tf", "tensorflow", "numpy", "onnx", "onnxruntime", "ai-edge-litert"),
    ),
    "ncnn": Toolchain(
        name="ncnn",
        kind=ToolchainKind.VENV,
        # INT8 needs no extra tool: converters/targets/ncnn_int8.py calibrates with the ncnn package itself.
        purpose="ONNX -> NCNN (pnnx binary, no torch)",
        no_deps=("pnnx==20261020",),
        executable=f"lib/{_PY}/site-packages/pnnx/pnnx",
        report=("pnnx",),
    ),
    "openvino": Toolchain(
        name="openvino",
        kind=ToolchainKind.IN_PROCESS,
        purpose="ONNX -> OpenVINO IR (+ NNCF INT8), in the SDK's environment",
        packages=("openvino>=2024.4", "nncf>=2.13"),
        extra="openvino",
        report=("openvino", "nncf"),
    ),
}


def root_dir() -> Path:
    """Where toolchain environments live (``$EDGE_SDK_TOOLCHAINS`` overrides the user cache dir)."""
    override = os.environ.get("EDGE_SDK_TOOLCHAINS")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edge-sdk")) / "toolchains"


def get_toolchain(name: str) -> Toolchain:
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise ConfigError(f"unknown toolchain {name!r} (known: {', '.join(TOOLCHAINS)})") from None


@dataclass
class ToolchainStatus:
    name: str
    kind: ToolchainKind
    installed: bool
    path: Path | None
    versions: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    detail: str = ""


def _venv_dir(tc: Toolchain) -> Path:
    return root_dir() / tc.name


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _in_process_versions(tc: Toolchain) -> dict[str, str]:
    versions = {}
    for dist in tc.report:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def status(name: str, with_size: bool = False) -> ToolchainStatus:
    """Whether ``name`` is installed and complete, its versions, location and (optionally) size."""
    tc = get_toolchain(name)
    if tc.kind is ToolchainKind.IN_PROCESS:
        versions = _in_process_versions(tc)
        missing = [d for d in tc.report if d not in versions]
        return ToolchainStatus(tc.name, tc.kind, not missing, Path(sys.prefix), versions,
                               detail=f"missing {', '.join(missing)}" if missing else "main environment")
    path = _venv_dir(tc)
    marker = _read_marker(path)
    size = _dir_size(path) if with_size and path.exists() else 0
    if marker is None:
        detail = "incomplete install" if path.exists() else "not installed"
        return ToolchainStatus(tc.name, tc.kind, False, path if path.exists() else None, {}, size, detail)
    if marker.get("pins") != tc.pins:
        return ToolchainStatus(tc.name, tc.kind, False, path, marker.get("versions", {}), size,
                               f"stale: installed for {marker.get('pins')}, want {tc.pins}")
    if not (path / tc.executable).exists():
        return ToolchainStatus(tc.name, tc.kind, False, path, marker.get("versions", {}), size,
                               f"broken: {tc.executable} is missing")
    return ToolchainStatus(tc.name, tc.kind, True, path, marker.get("versions", {}), size, "ok")


def _tail(lines: Sequence[str], n: int = TAIL_LINES) -> str:
    return "\n".join(list(lines)[-n:])


def _stream(cmd: list[str], log, on_line: Callable[[str], None] | None, timeout: float,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, deque[str]]:
    """Run ``cmd``, appending its output to ``log`` and reporting each line; returns (rc, tail).

    A reader thread drains the pipe so a child that hangs silently still hits the timeout.
    """
    tail: deque[str] = deque(maxlen=200)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise ToolchainError(f"cannot start {cmd[0]}: {exc}") from None

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            log.write(line + "\n")
            tail.append(line)
            if on_line:
                on_line(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        reader.join(5)
        raise ToolchainError(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:4]))} ...` "
                             f"timed out after {timeout:.0f}s; last output:\n{_tail(tail)}") from None
    reader.join()
    return rc, tail


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def install(name: str, on_line: Callable[[str], None] | None = None, force: bool = False,
            timeout: float = 3600.0) -> ToolchainStatus:
    """Install toolchain ``name`` (no-op when complete and current, unless ``force``)."""
    tc = get_toolchain(name)
    current = status(name)
    if current.installed and not force:
        return current
    if tc.kind is ToolchainKind.IN_PROCESS:
        # Installs the extra's packages into the running interpreter's environment.
        cmd = [sys.executable, "-m", "pip", "install", *tc.packages]
        with open(os.devnull, "w") as log:
            rc, tail = _stream(cmd, log, on_line, timeout)
        if rc != 0:
            raise ToolchainError(f"installing toolchain {name!r} (pip install 'edge-sdk[{tc.extra}]') failed:\n{_tail(tail)}")
        importlib.invalidate_caches()
        return status(name)

    with _install_lock(tc):
        current = status(name)  # another process may have installed it while this one waited
        if current.installed and not force:
            return current
        return _install_venv(tc, on_line, timeout)


@contextlib.contextmanager
def _install_lock(tc: Toolchain):
    """One installer per toolchain at a time: a second one (a CI job beside a shell, two test
    workers) would delete the environment the first is writing. Waits for the other to finish."""
    root_dir().mkdir(parents=True, exist_ok=True)
    with open(root_dir() / f"{tc.name}.lock", "w") as lock:  # closing it releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _install_venv(tc: Toolchain, on_line: Callable[[str], None] | None, timeout: float) -> ToolchainStatus:
    name = tc.name
    path = _venv_dir(tc)
    # Start from a clean directory: a previous half-install must not leak into this one.
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    py = path / "bin" / "python"
    log_path = path.parent / f"{tc.name}.install.log"
    with open(log_path, "w", encoding="utf-8") as log:
        # The venv's bundled pip is enough for wheels; upgrading it would be one more download.
        steps = [[sys.executable, "-m", "venv", str(path)]]
        if tc.packages:
            lock = []
            if tc.constraints:
                lock_path = path.parent / f"{tc.name}.constraints.txt"
                lock_path.write_text("\n".join(tc.constraints) + "\n", encoding="utf-8")
                lock = ["-c", str(lock_path)]
            steps.append([str(py), "-m", "pip", "install", *lock, *tc.packages])
        if tc.no_deps:
            steps.append([str(py), "-m", "pip", "install", "--no-deps", *tc.no_deps])
        for cmd in steps:
            remaining = timeout - (time.monotonic() - started)
            rc, tail = _stream(cmd, log, on_line, max(remaining, 1.0))
            if rc != 0:
                raise ToolchainError(f"installing toolchain {name!r} failed at `{' '.join(cmd[2:5])} ...` "
                                     f"(exit {rc}; full log {log_path}):\n{_tail(tail)}")
        freeze = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True,
                                text=True, timeout=300)
    if freeze.returncode != 0:
        raise ToolchainError(f"toolchain {name!r}: cannot list installed packages:\n{freeze.stderr[-2000:]}")
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(freeze.stdout)}
    versions = {d: installed[d] for d in tc.report if d in installed}
    if not (path / tc.executable).exists():
        raise ToolchainError(f"toolchain {name!r} installed but {tc.executable} is missing (log {log_path})")
    marker = {"name": tc.name, "pins": tc.pins, "versions": versions, "python": sys.version.split()[0],
              "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "install_seconds": round(time.monotonic() - started, 1)}
    # Written last: its presence is what makes the toolchain "installed".
    (path / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return status(name)


def require(name: str) -> Path:
    """The installed toolchain's executable, or ToolchainError naming the install command."""
    tc = get_toolchain(name)
    st = status(name)
    if not st.installed:
        raise ToolchainError(f"toolchain {name!r} ({tc.purpose}) is not usable ({st.detail}): "
                             f"run `edge-sdk toolchain install {name}`")
    return (st.path or _venv_dir(tc)) / tc.executable


@dataclass
class ToolRun:
    """A finished converter subprocess."""

    returncode: int
    output: str
    seconds: float

    def tail(self, n: int = TAIL_LINES) -> str:
        return _tail(self.output.splitlines(), n)

    def failure(self, tool: str, cause: str = "") -> str:
        """One line for a failed run: how ``tool`` ended, then ``cause`` or its last line that reads like an error."""
        if self.returncode < 0:
            try:
                how = f"{tool} crashed ({signal.Signals(-self.returncode).name})"
            except ValueError:
                how = f"{tool} crashed (signal {-self.returncode})"
        else:
            how = f"{tool} failed (exit {self.returncode})"
        if cause:
            return f"{how}: {cause}"
        errors = [ln.strip() for ln in self.output.splitlines()
                  if re.search(r"error|failed|cannot|unsupported|not supported", ln, re.I) and not _NOISE.search(ln)]
        return how + (f": {_ANSI.sub('', errors[-1])[:200]}" if errors else "")


def run(name: str, args: Sequence[str], cwd: Path, timeout: float = 1800.0,
        env: dict[str, str] | None = None, program: str | None = None) -> ToolRun:
    """Run the toolchain's program (or ``program``, relative to its venv) with ``args`` in ``cwd``.

    Output is captured and the network blocked (proxies point at a closed local port).

    A non-zero exit is returned (the caller maps it to a ConversionError with :meth:`ToolRun.tail`);
    a timeout kills the whole process group and raises ToolchainError with the output tail.
    """
    exe = require(name)
    if program is not None:
        exe = _venv_dir(get_toolchain(name)) / program
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    full_env.update({
        "PATH": f"{exe.parent}{os.pathsep}{full_env.get('PATH', '')}",
        "HTTP_PROXY": _NO_NETWORK_PROXY, "HTTPS_PROXY": _NO_NETWORK_PROXY,
        "http_proxy": _NO_NETWORK_PROXY, "https_proxy": _NO_NETWORK_PROXY, "NO_PROXY": "", "no_proxy": "",
        "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0",
        "PYTHONUNBUFFERED": "1",  # keep stdout and stderr in the order they happened
    })
    full_env.update(env or {})
    started = time.monotonic()
    log_path = Path(cwd) / f".{name}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        rc, _tail_lines = _stream([str(exe), *args], log, None, timeout, env=full_env, cwd=Path(cwd))
    output = log_path.read_text(encoding="utf-8", errors="replace")
    log_path.unlink(missing_ok=True)
    return ToolRun(rc, output, time.monotonic() - started)
