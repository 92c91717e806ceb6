"""KServe v2 request parsing: valid JSON/binary tensors decode exactly; anything else is a 4xx."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_sdk.daemon.http import RequestError, parse_infer_request, v2_datatype


def body(**request) -> bytes:
    return json.dumps(request).encode()


def test_flat_and_nested_data_decode_to_the_same_array() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    flat, _, rid, _ = parse_infer_request(body(id="r1", inputs=[{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()}]), None)
    nested, _, _, _ = parse_infer_request(body(inputs=[{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.tolist()}]), None)
    assert rid == "r1"
    for got in (flat["x"], nested["x"]):
        assert got.dtype == np.float32 and got.shape == (2, 3)
        np.testing.assert_array_equal(got, x)


def test_binary_extension_roundtrip() -> None:
    a = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    b = np.arange(5, dtype=np.int64)
    head = body(inputs=[
        {"name": "a", "shape": list(a.shape), "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": [5], "datatype": "INT64", "parameters": {"binary_data_size": b.nbytes}},
    ], outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    inputs, wanted, _, binary_out = parse_infer_request(head + a.tobytes() + b.tobytes(), len(head))
    np.testing.assert_array_equal(inputs["a"], a)
    np.testing.assert_array_equal(inputs["b"], b)
    assert wanted == ["y"] and binary_out == {"y"}


@pytest.mark.parametrize("raw, header, needle", [
    (b"{not json", None, "not valid JSON"),
    (b"[" * 200_000, None, "nested too deeply"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
     None, "nested too deeply"),
    (b"[1,2]", None, "JSON object"),
    (body(), None, "'inputs' must be a non-empty list"),
    (body(inputs=[]), None, "'inputs' must be a non-empty list"),
    (body(inputs=["x"]), None, "expected an object"),
    (body(inputs=[{"shape": [1], "datatype": "FP32", "data": [1]}]), None, "'name'"),
    (body(inputs=[{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": [1.5], "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP33", "data": [1, 2]}]), None, "unsupported datatype"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]), None, "unsupported datatype"),
    (body(inputs=[{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]), None, "needs 3"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, "a"]}]), None, "not a regular list"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]), None, "not a regular list"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]), None, "not a regular list"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "'data' is missing"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": 1}]), None, "'data' must be"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "extra": 1}]), None, "unknown keys"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "given twice"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], bogus=1), None, "unknown request keys"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], outputs="y"), None, "'outputs'"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], id=5), None, "'id'"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]), None, "no binary section"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]) + b"\0" * 4, -1, "outside"),
])
def test_malformed_requests_are_400_with_a_message(raw: bytes, header: int | None, needle: str) -> None:
    if header == -1:  # a header length past the end of the body
        header = len(raw) + 10
    with pytest.raises(RequestError) as err:
        parse_infer_request(raw, header)
    assert err.value.status == 400
    assert needle in str(err.value)


def test_binary_size_mismatches() -> None:
    head = body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}])
    with pytest.raises(RequestError, match="elements x 4 bytes"):
        parse_infer_request(head + b"\0" * 4, len(head))
    head = body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}])
    with pytest.raises(RequestError, match="runs past"):
        parse_infer_request(head + b"\0" * 4, len(head))
    with pytest.raises(RequestError, match="the inputs use 8"):
        parse_infer_request(head + b"\0" * 12, len(head))


def test_datatype_names() -> None:
    assert [v2_datatype(t) for t in ("float32", "float16", "int64", "uint8", "bool")] == ["FP32", "FP16", "INT64", "UINT8", "BOOL"]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=20)
_keys = st.sampled_from(["name", "shape", "datatype", "data", "parameters"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    st.lists(st.dictionaries(_keys, _json, max_size=5), max_size=3).map(lambda items: body(inputs=items)),
), st.one_of(st.none(), st.integers(-5, 300)))
@example(b'{"inputs":[{"shape":[],"datatype":[],"name":"0"}]}', None)  # an unhashable datatype, found under arm64
def test_fuzz_never_raises_anything_but_request_error(raw: bytes, header: int | None) -> None:
    try:
        inputs, *_ = parse_infer_request(raw, header)
    except RequestError as exc:
        assert 400 <= exc.status < 500
    else:
        assert all(isinstance(v, np.ndarray) for v in inputs.values())
