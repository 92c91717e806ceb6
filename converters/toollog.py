"""Third-party converter code, run quietly with what it says kept for the release's tool log.

onnxruntime's quantizer logs per-tensor chatter and its C++ sessions warn on stderr, its
entropy/percentile calibrators and NNCF print progress bars to stdout: none of that may reach
the CLI's output (or break ``--json``), yet the full text is what a user needs when a recipe
fails. :func:`quiet` captures it (Python ``sys.stdout``/``sys.stderr``, the file descriptors
native code writes to, root-logger records and warnings) and restores all of it on exit. Blocks
nest: what an inner block captured is also part of the enclosing block's log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ToolLog:
    """What the code run under :func:`quiet` printed, logged and warned, in that order per kind."""

    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(p.rstrip("\n") for p in self.parts if p.strip())


_open: list[ToolLog] = []  # the logs of the quiet() blocks being run, innermost last


@contextlib.contextmanager
def quiet() -> Iterator[ToolLog]:
    """``with quiet() as log: ...``: silence the block, then ``log.text`` holds what it said."""
    log = ToolLog()
    _open.append(log)
    buffer = io.StringIO()
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    native = _Captured()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_native_output(native))
            stack.enter_context(contextlib.redirect_stdout(buffer))
            stack.enter_context(contextlib.redirect_stderr(buffer))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            root.handlers = [handler]
            saved_level = root.level
            root.setLevel(min(saved_level, logging.WARNING) or logging.WARNING)  # a tool's warnings reach the log
            try:
                yield log
            finally:
                root.handlers = saved_handlers
                root.setLevel(saved_level)
                log.parts.append(buffer.getvalue())
                log.parts.extend(f"warning: {w.category.__name__}: {w.message}" for w in caught)
    finally:
        log.parts.append(native.read())
        _open.pop()
        if _open:
            _open[-1].parts.append(log.text)


class _Captured:
    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()

    def read(self) -> str:
        self.file.seek(0)
        text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return text


@contextlib.contextmanager
def _native_output(captured: _Captured) -> Iterator[None]:
    """Point file descriptors 1 and 2 (where C/C++ code writes) at ``captured``'s file, then back."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # not open (a detached daemon): nothing to capture there
                continue
            os.dup2(captured.file.fileno(), fd)
        yield
    finally:
        for stream in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
