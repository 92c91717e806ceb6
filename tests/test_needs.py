"""The CI guard (tests/support/needs.py): a missing dependency skips on a laptop and fails under CI=1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

TINY = '''
from needs import need_binary, need_module, not_applicable

def test_program():
    need_binary("edge-sdk-no-such-program")

def test_package():
    need_module("edge_sdk_no_such_package")

def test_not_applicable():
    not_applicable("the machine has one core")
'''


def run_tiny(tmp_path: Path, ci: bool) -> str:
    (tmp_path / "test_tiny.py").write_text(TINY)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(TESTS / "support")
    if ci:
        env["CI"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_tiny.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return result.stdout


@pytest.mark.parametrize("ci", [False, True], ids=["laptop", "ci"])
def test_a_missing_dependency_skips_here_and_fails_under_ci(tmp_path: Path, ci: bool) -> None:
    out = run_tiny(tmp_path, ci)
    summary = out.strip().splitlines()[-1]
    if ci:
        assert re.search(r"\b2 failed, 1 skipped\b", summary), out
        assert "FAILED test_tiny.py::test_program - Failed: program 'edge-sdk-no-such-program'" in out, out
        assert "FAILED test_tiny.py::test_package - Failed: Python package 'edge_sdk_no_such_package'" in out, out
    else:
        assert re.search(r"\b3 skipped\b", summary) and "failed" not in summary, out
        assert "not installed: program 'edge-sdk-no-such-program'" in out, out
    assert "not applicable here: the machine has one core" in out, out  # a skip either way


def test_no_test_skips_around_the_guard() -> None:
    """Only needs.py calls pytest.skip; a skipif must say it is not about a missing dependency."""
    offenders = []
    for path in TESTS.rglob("*.py"):
        if path.name in ("needs.py", "test_needs.py"):
            continue
        text = path.read_text()
        for match in re.finditer(r'pytest\.skip\(|importorskip\(|skipif\((?![^@]{0,300}?reason="not applicable here)', text):
            offenders.append(f"{path.relative_to(TESTS)}:{text[:match.start()].count(chr(10)) + 1}")
    assert not offenders, offenders
