"""Managed toolchain venvs: real installs into a temporary root, markers, failures, timeouts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.converters import toolchains
from edge_sdk.converters.toolchains import Toolchain, ToolchainKind
from edge_sdk.errors import ToolchainError

PROBE = Toolchain(name="probe", kind=ToolchainKind.VENV, purpose="test", executable="bin/python")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_SDK_TOOLCHAINS", str(tmp_path / "tc"))
    return tmp_path / "tc"


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory) -> Path:
    """A real venv-only toolchain ('probe': no packages, runs bin/python), installed once."""
    folder = tmp_path_factory.mktemp("probe-tc")
    old = os.environ.get("EDGE_SDK_TOOLCHAINS")
    os.environ["EDGE_SDK_TOOLCHAINS"] = str(folder)
    toolchains.TOOLCHAINS["probe"] = PROBE
    try:
        toolchains.install("probe")
        yield folder
    finally:
        toolchains.TOOLCHAINS.pop("probe", None)
        if old is None:
            os.environ.pop("EDGE_SDK_TOOLCHAINS", None)
        else:
            os.environ["EDGE_SDK_TOOLCHAINS"] = old


@pytest.fixture
def probe(probe_root, monkeypatch) -> str:
    monkeypatch.setenv("EDGE_SDK_TOOLCHAINS", str(probe_root))
    monkeypatch.setitem(toolchains.TOOLCHAINS, "probe", PROBE)
    return "probe"


def test_root_is_overridable(root):
    assert toolchains.root_dir() == root


def test_missing_toolchain_names_the_install_command(root):
    st = toolchains.status("tflite")
    assert not st.installed and st.detail == "not installed"
    with pytest.raises(ToolchainError, match="run `edge-sdk toolchain install tflite`"):
        toolchains.require("tflite")
    with pytest.raises(ToolchainError, match="edge-sdk toolchain install ncnn"):
        toolchains.run("ncnn", ["--help"], cwd=root.parent)


def test_unknown_toolchain_is_a_config_error(root):
    from edge_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown toolchain 'tf'.*tflite"):
        toolchains.status("tf")


def test_install_writes_a_marker_with_versions_and_is_idempotent(root):
    st = toolchains.install("ncnn")  # pnnx --no-deps: the real ncnn toolchain
    assert st.installed and st.versions == {"pnnx": "20261020"}
    marker = json.loads((root / "ncnn" / toolchains.MARKER).read_text())
    assert marker["pins"] == ["pnnx==20261020"] and marker["install_seconds"] > 0
    site = next((root / "ncnn" / "lib").glob("python*/site-packages"))
    assert not (site / "torch").exists()  # --no-deps kept torch (GBs of CUDA) out
    before = (root / "ncnn" / toolchains.MARKER).stat().st_mtime_ns
    assert toolchains.install("ncnn").installed
    assert (root / "ncnn" / toolchains.MARKER).stat().st_mtime_ns == before  # no reinstall
    run = toolchains.run("ncnn", [], cwd=root)  # pnnx without arguments prints its usage
    assert "inputshape" in run.output


def test_half_install_is_not_installed(root, monkeypatch):
    broken = Toolchain(name="broken", kind=ToolchainKind.VENV, purpose="test", executable="bin/python",
                       packages=(str(root.parent / "no-such-dir" / "edge_sdk_missing-1.0-py3-none-any.whl"),))
    monkeypatch.setitem(toolchains.TOOLCHAINS, "broken", broken)
    with pytest.raises(ToolchainError, match="installing toolchain 'broken' failed") as info:
        toolchains.install("broken")
    assert "edge_sdk_missing" in str(info.value)  # pip's own output tail
    st = toolchains.status("broken")
    assert not st.installed and st.detail == "incomplete install"
    assert (root / "broken" / "bin" / "python").exists() and not (root / "broken" / toolchains.MARKER).exists()


def test_concurrent_installs_make_the_environment_once(root, monkeypatch):
    """A second installer (CI beside a shell) waits for the first instead of deleting its venv."""
    import threading

    monkeypatch.setitem(toolchains.TOOLCHAINS, "probe", PROBE)
    made, real = [], toolchains._install_venv
    monkeypatch.setattr(toolchains, "_install_venv", lambda *a: made.append(1) or real(*a))
    results = []
    workers = [threading.Thread(target=lambda: results.append(toolchains.install("probe"))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [r.installed for r in results] == [True, True] and len(made) == 1
    assert (root / "probe.lock").exists()


def test_stale_marker_is_not_installed(probe, probe_root, monkeypatch):
    assert toolchains.status(probe).installed
    monkeypatch.setitem(toolchains.TOOLCHAINS, "probe", Toolchain(
        name="probe", kind=ToolchainKind.VENV, purpose="test", executable="bin/python", packages=("x==2",)))
    st = toolchains.status(probe)
    assert not st.installed and st.detail.startswith("stale")


def test_run_captures_output_and_exit_code(probe, tmp_path):
    run = toolchains.run(probe, ["-c", "import sys; print('hello'); print('oops', file=sys.stderr); sys.exit(3)"],
                         cwd=tmp_path, program="bin/python")
    assert run.returncode == 3
    assert "hello" in run.output and "oops" in run.output and run.tail().endswith("oops")


def test_run_blocks_the_network(probe, tmp_path):
    code = ("import urllib.request, sys\n"
            "try:\n    urllib.request.urlopen('https://example.com/x.npy', timeout=10)\n"
            "except Exception as e:\n    print('BLOCKED', type(e).__name__); sys.exit(0)\n"
            "print('REACHED'); sys.exit(1)")
    run = toolchains.run(probe, ["-c", code], cwd=tmp_path)
    assert run.returncode == 0 and "BLOCKED" in run.output, run.output


def test_run_timeout_kills_the_process_tree(probe, tmp_path):
    pid_file = tmp_path / "pid"
    code = (f"import os, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\nprint('started', flush=True)\ntime.sleep(120)")
    started = time.monotonic()
    with pytest.raises(ToolchainError, match="timed out after 2s") as info:
        toolchains.run(probe, ["-c", code], cwd=tmp_path, timeout=2)
    assert time.monotonic() - started < 60
    assert "started" in str(info.value)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the converter's child process survived the timeout")


@pytest.mark.requires("openvino")
def test_in_process_openvino_toolchain_reports_the_main_environment(root):
    st = toolchains.status("openvino")
    assert st.installed and st.kind is ToolchainKind.IN_PROCESS and "openvino" in st.versions


def test_cli_list_and_bad_install(root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["toolchain", "list", "--json"])
    assert exit_info.value.code in (0, None)
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) >= {"tflite", "ncnn", "openvino"}
    assert rows["tflite"]["installed"] is False and rows["tflite"]["detail"] == "not installed"
    with pytest.raises(SystemExit) as exit_info:
        main(["toolchain", "install", "tensorflow"])
    assert exit_info.value.code == 1
    assert "unknown toolchain 'tensorflow'" in capsys.readouterr().err
    assert not root.exists() or not list(root.iterdir())


def test_a_failure_line_names_the_cause_not_tensorflows_cuda_probe():
    from edge_sdk.converters.toolchains import ToolRun

    output = ("2026-12-04 20:05:16.459484: E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc:51] failed "
              "call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert ToolRun(-11, output, 1.0).failure("TensorFlow's converter") == "TensorFlow's converter crashed (SIGSEGV)"
    output += "ValueError: cannot quantize LSTM\n"
    assert ToolRun(1, output, 1.0).failure("onnx2tf") == "onnx2tf failed (exit 1): ValueError: cannot quantize LSTM"
