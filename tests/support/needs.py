"""The CI guard: every skip for a missing dependency goes through here.

Under ``CI`` (set by ``.ci/run``) a missing package, program, toolchain or system facility FAILS the
test instead of skipping it: CI installs everything (``make test``), so a skip there would hide a
broken setup instead of testing it. A skip that is not about a missing dependency (the machine has
one core, a part is installed so the "without it" case cannot run) goes through
:func:`not_applicable`, which always skips and says so.

Tests import these directly (``from needs import need_module``; ``tests/support`` is on pytest's
``pythonpath``); ``tests/test_needs.py`` checks that nothing else in ``tests/`` skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(reason: str) -> NoReturn:
    """Skip a test whose dependency is not installed here; fail it when ``$CI`` is set."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: every dependency of the test suite must be installed)", pytrace=False)
    pytest.skip(f"not installed: {reason}")


def not_applicable(reason: str) -> NoReturn:
    """Skip for a reason that is not a missing dependency (also under CI): the reason says which."""
    pytest.skip(f"not applicable here: {reason}")


def need_module(name: str, install: str = "make venv") -> ModuleType:
    """Import and return ``name``, or :func:`missing` naming how to install it."""
    if importlib.util.find_spec(name) is None:
        missing(f"Python package {name!r} ({install} installs it)")
    return importlib.import_module(name)


def need_binary(name: str, *candidates: str | Path, install: str = "scripts/install-system-deps.sh") -> Path:
    """The path of program ``name`` (on PATH or at one of ``candidates``), or :func:`missing`."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    missing(f"program {name!r} ({install} installs it)")


def need_toolchain(name: str) -> None:
    """An isolated converter toolchain (``edge-sdk toolchain install NAME``), or :func:`missing`."""
    from edge_sdk.converters import toolchains

    status = toolchains.status(name)
    if not status.installed:
        missing(f"toolchain {name!r} {status.detail}: run `edge-sdk toolchain install {name}` (make toolchains)")


def need_root(what: str) -> None:
    """Tests that need root (mounts, cgroups) skip as not applicable for other users, and run under CI."""
    if os.geteuid() != 0:
        not_applicable(f"{what} needs root")
