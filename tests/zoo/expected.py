"""What the converter does not achieve yet on the corpus: each entry is a strict xfail of
``test_zoo.py`` naming the gap (issue 11). When a change closes a gap, that test XPASSes and
fails: delete the entry (the corpus ratchets up). ``benchmarks/zoo.py`` has the figures."""

from __future__ import annotations

# Models the tests convert (all four targets each); benchmarks/zoo.py runs every model in CASES.
# More join as their conversions fit the CI budget (magika next; see /work/wt/NOTES.md).
TESTED = ("centerface", "ocr-cls")

GAPS: dict[tuple[str, str], str] = {
    ("ocr-cls", "onnx-int8-goal"): "onnx-int8 is 0.54x the FP32 size (goal 0.35): in a 0.58 MB model the QDQ nodes, "
                                   "their names, per-channel scales and int32 biases are ~45% of the INT8 file",
}
