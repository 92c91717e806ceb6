"""KServe v2 request parsing: valid JSON/binary tensors decode exactly, however the body is cut into
chunks; anything else is a 4xx."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_sdk.daemon.jsonstream import JsonStream
from edge_sdk.daemon.kserve import ApiError as RequestError
from edge_sdk.daemon.kserve import BodyDecoder, decode_infer_body, infer_request_from_json, json_plan, v2_datatype


def body(**request) -> bytes:
    return json.dumps(request).encode()


def parse_infer_request(raw: bytes, header: int | None, streamed: bool = False):
    """(inputs, wanted output names, id, binary output names), as the route sees them: a small body
    of known size is decoded at once; ``streamed`` feeds it in 7-byte chunks, size unknown (gzip)."""
    if streamed:
        decoder = BodyDecoder(header, 1 << 30)
        for i in range(0, len(raw), 7):
            decoder.feed(raw[i:i + 7])
        request = infer_request_from_json(*decoder.finish())
    else:
        request = decode_infer_body(raw, header)
    wanted = [o.name for o in request.outputs] if request.outputs is not None else None
    binary = {o.name for o in request.outputs or () if o.binary}
    return request.inputs, wanted, request.id, binary


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
    (b"[" * 200_000, None, "must be a JSON object"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
     None, "nested too deeply"),
    (b"[1,2]", None, "JSON object"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [null]}]}', None, "null"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2, 3]}]}', None, "(more than the 2|needs 2)"),
    (body(), None, "'inputs' must be a non-empty list"),
    (body(inputs=[]), None, "'inputs' must be a non-empty list"),
    (body(inputs=["x"]), None, "expected an object"),
    (body(inputs=[{"shape": [1], "datatype": "FP32", "data": [1]}]), None, "'name'"),
    (body(inputs=[{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": [1.5], "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]), None, "'shape'"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP33", "data": [1, 2]}]), None, "unsupported datatype"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]), None, "BYTES elements must be strings"),
    (body(inputs=[{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]), None, "needs 3"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, "a"]}]), None, "not a (regular )?list of (float32|FP32)"),
    (body(inputs=[{"data": [[1], 2], "name": "x", "shape": [2], "datatype": "FP32"}]), None, "not a regular list"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]), None, "not a (regular )?list of (uint8|UINT8)"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "'data' is missing"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": 1}]), None, "'data' must be"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "extra": 1}]), None, "unknown keys"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "given twice"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], bogus=1), None, "unknown request keys"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], outputs="y"), None, "'outputs'"),
    (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], id=5), None, "'id'"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]), None, "no binary section"),
    (body(inputs=[{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]) + b"\0" * 4, -1, "outside|past the end"),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_malformed_requests_are_400_with_a_message(raw: bytes, header: int | None, needle: str, streamed: bool) -> None:
    if header == -1:  # a header length past the end of the body
        header = len(raw) + 10
    with pytest.raises(RequestError) as err:
        parse_infer_request(raw, header, streamed)
    assert err.value.status.http == 400
    assert re.search(needle, str(err.value)), str(err.value)


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
    decoded = []
    for streamed in (False, True):
        try:
            inputs, *_ = parse_infer_request(raw, header, streamed)
        except RequestError as exc:
            assert 400 <= exc.status.http < 500
        else:
            assert all(isinstance(v, np.ndarray) for v in inputs.values())
            decoded.append(inputs)
    if len(decoded) == 2:  # what both ways accept, they decode alike
        assert decoded[0].keys() == decoded[1].keys()
        for name, array in decoded[0].items():
            assert array.dtype == decoded[1][name].dtype
            np.testing.assert_array_equal(array, decoded[1][name])


@pytest.mark.parametrize("streamed", [False, True])
def test_nested_data_in_any_key_order_and_non_finite_values(streamed: bool) -> None:
    want = np.array([[1, np.nan], [np.inf, -np.inf]], np.float32)
    for item in ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, "NaN"], ["Infinity", "-Infinity"]]},
                 {"data": [[1, float("nan")], [float("inf"), float("-inf")]], "datatype": "FP32", "shape": [2, 2], "name": "x"}):
        inputs, *_ = parse_infer_request(body(inputs=[item]), None, streamed)
        np.testing.assert_array_equal(inputs["x"], want)


def test_bytes_tensors_json_and_binary() -> None:
    inputs, *_ = parse_infer_request(body(inputs=[{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["héllo", ""]}]), None)
    assert inputs["t"].tolist() == ["héllo".encode(), b""]
    raw = b"\x02\x00\x00\x00hi\x00\x00\x00\x00"
    head = body(inputs=[{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}])
    inputs, *_ = parse_infer_request(head + raw, len(head))
    assert inputs["t"].tolist() == [b"hi", b""]
    with pytest.raises(RequestError, match="element 0 of 9 bytes runs past"):
        parse_infer_request(head + b"\x09\x00\x00\x00hi\x00\x00\x00\x00", len(head))


def test_a_declared_shape_beyond_the_body_cap_is_413_before_any_data() -> None:
    decoder = BodyDecoder(None, max_body_bytes=1 << 20)
    with pytest.raises(RequestError) as err:
        decoder.feed(b'{"inputs": [{"name": "x", "shape": [1, 3, 4096, 4096], "datatype": "FP32", "data": [')
    assert err.value.status.http == 413 and "declares 50331648 elements" in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.booleans(), st.booleans())
def test_any_chunking_decodes_like_the_whole_body(cuts: list[int], nested: bool, binary_out: bool) -> None:
    x = np.random.default_rng(len(cuts)).standard_normal((3, 4)).astype(np.float32)
    doc = {"id": "é\\\"", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                       "data": x.tolist() if nested else x.ravel().tolist()},
                                      {"name": "n", "shape": [2], "datatype": "INT64", "data": [-1, 2**40]}],
           "outputs": [{"name": "y", "parameters": {"binary_data": binary_out, "classification": 2}}]}
    raw = json.dumps(doc).encode()
    stream = JsonStream(json_plan(1 << 20))
    pos = 0
    for cut in cuts * (len(raw) // sum(cuts) + 1):
        stream.feed(raw[pos:pos + cut])
        pos += cut
        if pos >= len(raw):
            break
    request = infer_request_from_json(stream.close(), None)
    np.testing.assert_array_equal(request.inputs["x"], x)
    assert request.inputs["n"].tolist() == [-1, 2**40] and request.id == doc["id"]
    assert request.outputs[0].binary == binary_out and request.outputs[0].class_count == 2
