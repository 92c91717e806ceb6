"""The built wheel holds every subpackage and the profile data (a missing one is silently dropped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib, json, pkgutil, sys, edge_sdk
assert edge_sdk.__file__.startswith(sys.prefix), edge_sdk.__file__
names = [m.name for m in pkgutil.walk_packages(edge_sdk.__path__, "edge_sdk.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from edge_sdk.profiles import builtin_profiles
print(json.dumps({"modules": names, "profiles": len(builtin_profiles())}))
"""


@pytest.mark.slow
def test_wheel_installs_and_imports_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("edge_sdk-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    # Dependencies come from the test venv via PYTHONPATH (which does not process .pth files, so
    # the editable install of edge_sdk stays invisible and the wheel is what gets imported).
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    out = subprocess.run([str(py), "-c", CHECK], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["profiles"] >= 8
    assert set(found["modules"]) == _source_modules()


def _source_modules() -> set[str]:
    """Every module the wheel must hold: each .py under the source folders ``package-dir`` maps."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    names = set()
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join([package, *parts]))
    return names - {"edge_sdk"}
