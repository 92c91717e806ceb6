"""The daemon's Open Inference Protocol, driven only through the official ``tritonclient.http`` and
``tritonclient.grpc`` (sync and asyncio; JSON and binary; no shared memory): two models x two
versions each, checked bit-exact against in-process ``EdgeModel.run`` of the same release, and
every refusal mapped to its HTTP status and gRPC code.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

import edge_sdk
from edge_sdk import samples
from edge_sdk.manifest import MANIFEST_NAME, load_manifest

from .conftest import DaemonProcess, _convert, fusion_inputs, write_config

pytestmark = pytest.mark.requires("tritonclient", "grpc", "gevent")

LABELS = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def repo(fusion_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/fusion/{v1,v2}, root/cnn/{v1,v2}: each version with its own weights; cnn v2 has labels."""
    root = tmp_path_factory.mktemp("compat-repo")
    (root / "fusion").mkdir()
    (root / "fusion" / "v1").symlink_to(fusion_release)
    _convert(samples.save(samples.make_multimodal(seed=1), root / "fusion2.onnx"), root / "fusion" / "v2", 2, "fusion")
    for version in (1, 2):
        _convert(samples.save(samples.make_cnn(seed=version, width=8), root / f"cnn{version}.onnx"),
                 root / "cnn" / f"v{version}", version, "cnn")
    manifest_path = root / "cnn" / "v2" / MANIFEST_NAME
    manifest = load_manifest(root / "cnn" / "v2").model_copy(update={"labels": {"logits": LABELS}})
    manifest_path.write_bytes(manifest.to_bytes())
    return root


WORDS = ["cat", "dog", "vögel"]
NAMES = ["Katze", "Hund", "Vögel"]


def make_label_model(path: Path) -> Path:
    """A string model (ai.onnx.ml LabelEncoders): text [3] -> label int64 [3] and name string [3]."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("LabelEncoder", ["text"], ["label"], domain="ai.onnx.ml", keys_strings=WORDS,
                              values_int64s=[0, 1, 2], default_int64=-1),
             helper.make_node("LabelEncoder", ["label"], ["name"], domain="ai.onnx.ml", keys_int64s=[0, 1, 2],
                              values_strings=NAMES, default_string="?")]
    graph = helper.make_graph(nodes, "labels", [helper.make_tensor_value_info("text", TensorProto.STRING, [3])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [3]),
                               helper.make_tensor_value_info("name", TensorProto.STRING, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def labels_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labels")
    return _convert(make_label_model(root / "labels.onnx"), root / "release", 1, "labels")


@pytest.fixture(scope="module")
def daemon(repo: Path, labels_release: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("compat-daemon")
    config = write_config(folder, [{"name": "fusion", "release": str(repo / "fusion"), "precision": "fp32"},
                                   {"name": "cnn", "release": str(repo / "cnn"), "precision": "fp32"},
                                   {"name": "labels", "release": str(labels_release), "precision": "fp32"}],
                          api={"max_body_bytes": 4_000_000, "max_inactive_versions": 1})
    proc = DaemonProcess(config).ready()
    proc.grpc_url = f"127.0.0.1:{(folder / 'state' / 'grpc.port').read_text().strip()}"
    proc.http_url = proc.url.removeprefix("http://")
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.kill()


@pytest.fixture(scope="module")
def references(repo: Path):
    models = {(name, v): edge_sdk.EdgeModel.load(repo / name / f"v{v}", profile="generic-x86_64", precision="fp32",
                                                  monitor=False) for name in ("fusion", "cnn") for v in (1, 2)}
    yield models
    for model in models.values():
        model.close()


def feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    if name == "fusion":
        return fusion_inputs(seed)
    return {"image": np.random.default_rng(seed).random((1, 3, 32, 32), dtype=np.float32)}


def auth(daemon) -> dict[str, str]:
    return {"authorization": f"Bearer {daemon.token}"}  # lower case: gRPC metadata keys must be


def http_client(daemon):
    import tritonclient.http as th

    return th.InferenceServerClient(daemon.http_url)


def grpc_client(daemon):
    import tritonclient.grpc as tg

    return tg.InferenceServerClient(daemon.grpc_url)


def http_inputs(x: dict[str, np.ndarray], binary: bool):
    import tritonclient.http as th

    out = []
    for name, array in x.items():
        item = th.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array, binary_data=binary)
        out.append(item)
    return out


def grpc_inputs(x: dict[str, np.ndarray]):
    import tritonclient.grpc as tg

    out = []
    for name, array in x.items():
        item = tg.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array)
        out.append(item)
    return out


def status_of(exc) -> str:
    return exc.status()


@pytest.mark.parametrize("name", ["fusion", "cnn"])
def test_metadata_config_and_readiness_of_every_version(daemon, name) -> None:
    h, g = http_client(daemon), grpc_client(daemon)
    headers = auth(daemon)
    assert h.is_server_live() and g.is_server_live()  # liveness needs no token (probes)
    assert h.is_server_ready(headers=headers) and g.is_server_ready(headers=headers)
    meta = h.get_server_metadata(headers=headers)
    assert meta["name"] == "edge-sdk" and "model_repository" in meta["extensions"]
    assert g.get_server_metadata(headers=headers).extensions == meta["extensions"]
    for version in ("", "1", "2"):
        hm = h.get_model_metadata(name, version, headers=headers)
        gm = g.get_model_metadata(name, version, headers=headers, as_json=True)
        assert hm["versions"] == ["1", "2"] == gm["versions"]
        assert [i["name"] for i in hm["inputs"]] == [i["name"] for i in gm["inputs"]]
        assert hm["parameters"]["release_version"] == int(version or 2)
        hc = h.get_model_config(name, version, headers=headers)
        gc = g.get_model_config(name, version, headers=headers, as_json=True)["config"]
        assert hc["name"] == name == gc["name"] and hc["backend"] == "onnxruntime" == gc["backend"]
        assert hc["platform"] == "onnxruntime_onnx" and hc["max_batch_size"] == 0
        assert [i["data_type"] for i in hc["input"]] == ["TYPE_FP32"] * len(hc["input"])
        assert [i["dims"] for i in gc["input"]] == [[str(d) for d in i["dims"]] for i in hc["input"]]  # int64 as JSON strings
        assert gc["parameters"]["precision"]["string_value"] == "fp32" == hc["parameters"]["precision"]["string_value"]
        variants = json.loads(hc["parameters"]["variants"]["string_value"])
        assert {v["precision"] for v in variants} >= {"fp32"}
    # The active (newest) version is loaded; the older one loads on the first call naming it.
    assert h.is_model_ready(name, "2", headers=headers) and g.is_model_ready(name, "", headers=headers)


@pytest.mark.parametrize("name", ["fusion", "cnn"])
@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_every_transport_matches_in_process(daemon, references, name, version) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    x = feeds(name, int(version))
    want = references[(name, int(version))].run(x)
    (out,) = want
    h, g = http_client(daemon), grpc_client(daemon)
    for binary in (False, True):
        # (a fresh headers dict per call: tritonclient.http adds its own headers to the one it is given)
        result = h.infer(name, http_inputs(x, binary), model_version=version, headers=auth(daemon),
                         outputs=[th.InferRequestedOutput(out, binary_data=binary)], request_id=f"r-{binary}")
        np.testing.assert_array_equal(result.as_numpy(out), want[out])
        assert result.get_response()["model_version"] == version and result.get_response()["id"] == f"r-{binary}"
    result = g.infer(name, grpc_inputs(x), model_version=version, headers=auth(daemon),
                     outputs=[tg.InferRequestedOutput(out)])
    np.testing.assert_array_equal(result.as_numpy(out), want[out])
    assert result.get_response().model_version == version
    for algorithm in ("gzip", "deflate"):
        result = h.infer(name, http_inputs(x, True), model_version=version, headers=auth(daemon),
                         request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy(out), want[out])
    assert h.is_model_ready(name, version, headers=auth(daemon))


def test_grpc_typed_contents(daemon, references) -> None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = feeds("fusion", 3)
    request = service_pb2.ModelInferRequest(model_name="fusion")
    for name, array in x.items():
        tensor = request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    with grpc.insecure_channel(daemon.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {daemon.token}")])
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)
    np.testing.assert_array_equal(got, references[("fusion", 2)].run(x)["scores"])


def test_async_clients(daemon, references) -> None:
    import tritonclient.grpc.aio as tga
    import tritonclient.http.aio as tha

    x = feeds("cnn", 5)
    want = references[("cnn", 2)].run(x)["logits"]

    async def main() -> None:
        h, g = tha.InferenceServerClient(daemon.http_url), tga.InferenceServerClient(daemon.grpc_url)
        try:
            for binary in (False, True):
                inp = tha.InferInput("image", [1, 3, 32, 32], "FP32")
                inp.set_data_from_numpy(x["image"], binary_data=binary)
                r = await h.infer("cnn", [inp], headers=auth(daemon))
                np.testing.assert_array_equal(r.as_numpy("logits"), want)
            inp = tga.InferInput("image", [1, 3, 32, 32], "FP32")
            inp.set_data_from_numpy(x["image"])
            results = await asyncio.gather(*(g.infer("cnn", [inp], headers=auth(daemon)) for _ in range(8)))
            for r in results:
                np.testing.assert_array_equal(r.as_numpy("logits"), want)
            assert await g.is_model_ready("cnn", headers=auth(daemon))
        finally:
            await h.close()
            await g.close()

    asyncio.run(main())


def test_bytes_tensors_in_and_out_over_every_transport(daemon, labels_release: Path) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    text = np.array(["dog", "fish", "vögel"], dtype=object)
    model = edge_sdk.EdgeModel.load(labels_release, profile="generic-x86_64", precision="fp32", monitor=False)
    want = model.run({"text": text})
    model.close()
    assert want["label"].tolist() == [1, -1, 2] and want["name"].tolist() == ["Hund", "?", "Vögel"]
    meta = http_client(daemon).get_model_metadata("labels", headers=auth(daemon))
    assert [(t["name"], t["datatype"]) for t in meta["inputs"] + meta["outputs"]] == \
        [("text", "BYTES"), ("label", "INT64"), ("name", "BYTES")]
    h, g = http_client(daemon), grpc_client(daemon)
    for binary in (False, True):  # JSON strings, or the binary extension's length-prefixed elements
        item = th.InferInput("text", [3], "BYTES")
        item.set_data_from_numpy(text, binary_data=binary)
        result = h.infer("labels", [item], headers=auth(daemon), outputs=[
            th.InferRequestedOutput("label", binary_data=binary), th.InferRequestedOutput("name", binary_data=binary)])
        np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
        names = result.as_numpy("name")
        assert [n.decode() if isinstance(n, bytes) else n for n in names] == want["name"].tolist()
    item = tg.InferInput("text", [3], "BYTES")
    item.set_data_from_numpy(np.array([t.encode() for t in text], dtype=object))
    result = g.infer("labels", [item], headers=auth(daemon))
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
    assert [n.decode() for n in result.as_numpy("name")] == want["name"].tolist()
    # A number where the model takes strings is refused, naming both datatypes.
    from tritonclient.utils import InferenceServerException

    wrong = tg.InferInput("text", [3], "FP32")
    wrong.set_data_from_numpy(np.zeros(3, np.float32))
    with pytest.raises(InferenceServerException) as err:
        g.infer("labels", [wrong], headers=auth(daemon))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "datatype FP32 but the model takes BYTES" in err.value.message()


def test_classification_with_labels_from_the_manifest(daemon, references) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    x = feeds("cnn", 9)
    logits = references[("cnn", 2)].run(x)["logits"][0]
    top = np.argsort(-logits)[:3]
    want = [f"{str(logits[i])}:{i}:class-{i}" for i in top]
    h, g = http_client(daemon), grpc_client(daemon)
    for binary in (False, True):
        r = h.infer("cnn", http_inputs(x, True), headers=auth(daemon),
                    outputs=[th.InferRequestedOutput("logits", binary_data=binary, class_count=3)])
        assert [t.decode() if binary else t for t in r.as_numpy("logits").ravel()] == want  # JSON BYTES come as str
    r = g.infer("cnn", grpc_inputs(x), headers=auth(daemon), outputs=[tg.InferRequestedOutput("logits", class_count=3)])
    assert [t.decode() for t in r.as_numpy("logits").ravel()] == want
    # Version 1 has no labels: "score:index".
    r = h.infer("cnn", http_inputs(x, True), model_version="1", headers=auth(daemon),
                outputs=[th.InferRequestedOutput("logits", class_count=2)])
    assert all(len(item.split(b":")) == 2 for item in r.as_numpy("logits").ravel())


def test_repository_index_unload_load(daemon) -> None:
    h, g = http_client(daemon), grpc_client(daemon)
    headers = auth(daemon)
    index = h.get_model_repository_index(headers=headers)
    assert {(m["name"], m["version"]) for m in index} == {("cnn", "1"), ("cnn", "2"), ("fusion", "1"), ("fusion", "2"),
                                                          ("labels", "1")}
    assert {m["state"] for m in index if m["version"] == "2"} == {"READY"}
    grpc_index = g.get_model_repository_index(headers=headers, as_json=True)["models"]
    assert sorted((m["name"], m["version"], m["state"]) for m in grpc_index) == \
        sorted((m["name"], m["version"], m["state"]) for m in index)
    from tritonclient.utils import InferenceServerException

    h.unload_model("fusion", headers=headers)
    assert not h.is_model_ready("fusion", headers=headers) and not g.is_model_ready("fusion", headers=headers)
    with pytest.raises(InferenceServerException) as err:
        h.infer("fusion", http_inputs(feeds("fusion"), True), headers=auth(daemon))
    assert status_of(err.value) == "503" and "unloaded" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        g.infer("fusion", grpc_inputs(feeds("fusion")), headers=headers)
    assert status_of(err.value) == "StatusCode.UNAVAILABLE"
    assert h.is_model_ready("cnn", headers=headers)  # one model's unload leaves the other serving
    g.load_model("fusion", headers=headers)
    assert h.is_model_ready("fusion", headers=headers)
    g.unload_model("fusion", headers=headers)
    assert not g.is_model_ready("fusion", headers=headers)
    h.load_model("fusion", headers=headers)
    assert g.is_model_ready("fusion", headers=headers)


def test_errors_map_to_http_status_and_grpc_code(daemon) -> None:
    from tritonclient.utils import InferenceServerException

    h, g = http_client(daemon), grpc_client(daemon)
    headers = auth(daemon)
    cases = [
        ("unknown version", lambda c: c.get_model_metadata("cnn", "7", headers=headers), "404", "NOT_FOUND", "no version 7"),
        ("bad version", lambda c: c.get_model_config("cnn", "abc", headers=headers), "404", "NOT_FOUND", "no version 'abc'"),
        ("unknown model", lambda c: c.get_model_metadata("nope", headers=headers), "404", "NOT_FOUND", "unknown model"),
        ("load unknown", lambda c: c.load_model("nope", headers=headers), "404", "NOT_FOUND", "not a configured model"),
        ("no token", lambda c: c.get_model_metadata("cnn"), "401", "UNAUTHENTICATED", "authentication required"),
        ("bad token", lambda c: c.get_model_metadata("cnn", headers={"authorization": "Bearer nope"}), "401",
         "UNAUTHENTICATED", "not valid"),
        ("load with a config", lambda c: c.load_model("cnn", headers=headers, config="{}"), "400", "INVALID_ARGUMENT",
         "not supported"),
    ]
    for case, call, http_status, grpc_code, needle in cases:
        for client, want in ((h, http_status), (g, f"StatusCode.{grpc_code}")):
            with pytest.raises(InferenceServerException) as err:
                call(client)
            assert status_of(err.value) == want, (case, err.value)
            assert needle in err.value.message(), (case, err.value.message())
    import tritonclient.grpc as tg
    import tritonclient.http as th

    wrong = {"image": np.zeros((1, 3, 16, 16), np.float32)}
    for client, inputs, want in ((h, http_inputs(wrong, True), "400"), (g, grpc_inputs(wrong), "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as err:
            client.infer("cnn", inputs, headers=auth(daemon))
        assert status_of(err.value) == want and "shape [1, 3, 16, 16]" in err.value.message()
    # A gRPC message over the cap (api.max_body_bytes = 4 MB) is refused by gRPC itself.
    big = tg.InferInput("image", [1, 3, 640, 640], "FP32")
    big.set_data_from_numpy(np.zeros((1, 3, 640, 640), np.float32))
    with pytest.raises(InferenceServerException) as err:
        g.infer("cnn", [big], headers=headers)
    assert status_of(err.value) == "StatusCode.RESOURCE_EXHAUSTED"
    _ = th  # (http client above)


def test_compressed_bodies_that_do_not_inflate_or_inflate_past_the_cap(daemon) -> None:
    url = f"{daemon.url}/v2/models/cnn/infer"
    headers = {**auth(daemon), "Content-Encoding": "gzip"}
    r = httpx.post(url, content=b"this is not gzip", headers=headers)
    assert r.status_code == 400 and "does not inflate" in r.json()["error"]
    r = httpx.post(url, content=gzip.compress(b'{"inputs": [')[:-6], headers=headers)
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    bomb = zlib.compress(b'{"inputs": ' + b" " * 10_000_000, 9)  # 10 MB from ~10 KB
    r = httpx.post(url, content=bomb, headers={**auth(daemon), "Content-Encoding": "deflate"})
    assert r.status_code == 413 and "inflates past the 4000000-byte limit" in r.json()["error"]
    r = httpx.post(url, content=b"{}", headers={**auth(daemon), "Content-Encoding": "br"})
    assert r.status_code == 415 and "not supported" in r.json()["error"]
    assert httpx.get(daemon.url + "/v2/health/live").status_code == 200
