"""quiet(): a tool's chatter is kept for its log, and every piece of process state comes back as it was."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest

from edge_sdk.converters.toollog import quiet


def test_everything_a_tool_says_is_captured_not_shown(capfd):
    with quiet() as log:
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"native stdout\n")  # what C/C++ code (onnxruntime's logger, pnnx) writes
        os.write(2, b"native stderr\n")
        logging.getLogger("test_toollog.quantizer").warning("tensor x has no range")
        warnings.warn("deprecated option", DeprecationWarning)
    shown = capfd.readouterr()
    assert shown.out == "" and shown.err == ""
    for line in ("python stdout", "python stderr", "native stdout", "native stderr",
                 "WARNING test_toollog.quantizer: tensor x has no range", "warning: DeprecationWarning: deprecated option"):
        assert line in log.text


def test_state_is_restored_also_when_the_tool_raises(capfd):
    root = logging.getLogger()
    handlers, filters, disabled = root.handlers[:], warnings.filters[:], logging.root.manager.disable
    with pytest.raises(RuntimeError, match="boom"), quiet() as log:
        os.write(2, b"last words before the crash\n")
        raise RuntimeError("boom")
    assert "last words before the crash" in log.text
    assert root.handlers == handlers and warnings.filters == filters and logging.root.manager.disable == disabled
    print("visible again")
    os.write(2, b"native visible again\n")
    shown = capfd.readouterr()
    assert shown.out == "visible again\n" and shown.err == "native visible again\n"


def test_an_inner_block_has_its_own_text_and_the_outer_one_keeps_it_too():
    with quiet() as outer:
        os.write(1, b"outer before\n")
        with quiet() as inner:
            os.write(1, b"inner\n")
        os.write(1, b"outer after\n")
    assert inner.text == "inner"
    assert sorted(outer.text.splitlines()) == ["inner", "outer after", "outer before"]
