"""What the converter does not achieve yet on the corpus: each entry is a strict xfail of
``test_zoo.py`` naming the gap (issue 11). When a change closes a gap, that test XPASSes and
fails: delete the entry (the corpus ratchets up). ``benchmarks/zoo.py`` has the figures."""

from __future__ import annotations

# Models the tests convert (all four targets each); benchmarks/zoo.py runs every model in CASES.
# More join as their conversions fit the CI budget (ocr-det and ocr-rec next). Not yet, measured 2026-12-02
# (2 shared cores): minilm alone ran past 8m41s (still in onnx2tf) against ~8 min for both newcomers;
# silero-vad does not convert: onnxruntime rejects the loader's shape-inferred model.fp32.onnx
# (If_0 then-branch LSTM: "First input tensor must have rank 3") though it runs the source model.
TESTED = ("centerface", "ocr-cls", "magika")

GAPS: dict[tuple[str, str], str] = {
    ("ocr-cls", "onnx-int8-goal"): "onnx-int8 is 0.54x the FP32 size (goal 0.35): in a 0.58 MB model the QDQ nodes, "
                                   "their names, per-channel scales and int32 biases are ~45% of the INT8 file",
    ("magika", "tflite-int8"): "onnx2tf's conversion itself is wrong: TFLite FP32 already loses 94 points top-1 "
                               "(int8 full-integer and dynamic-range alike)",
    ("magika", "openvino-int8"): "NNCF INT8 loses 22.5 points top-1 on validation",
    ("magika", "ncnn-int8"): "pnnx crashes (SIGSEGV) on the model",
    ("corpus", "tflite"): "TFLite INT8 accepted within budget on 2 of 3 tested families (magika: -94 points, from FP32 on)",
    ("corpus", "openvino"): "OpenVINO INT8 accepted within budget on 2 of 3 tested families (magika: -22.5 points)",
}
