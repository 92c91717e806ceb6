"""The shipped gRPC module ``edge_sdk/daemon/proto/kserve_pb2.py`` is what ``kserve.proto`` compiles to."""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

from needs import need_module

import edge_sdk

PROTO = "edge_sdk/daemon/proto/kserve.proto"
ROOT = Path(edge_sdk.__file__).resolve().parent.parent  # the name protoc records is relative to this


def compiled(proto_root: Path, tmp_path: Path):
    """The FileDescriptorProto that protoc (grpcio-tools) embeds in the module it makes of ``proto_root/PROTO``."""
    protoc = need_module("grpc_tools.protoc", "make venv (grpcio-tools, a dev dependency)")
    from google.protobuf import descriptor_pb2

    out = Path(tempfile.mkdtemp(dir=tmp_path))
    assert protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", PROTO]) == 0
    module = ast.parse((out / PROTO).with_name("kserve_pb2.py").read_text())
    (serialized,) = [ast.literal_eval(node.args[0]) for node in ast.walk(module)
                     if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile"]
    return descriptor_pb2.FileDescriptorProto.FromString(serialized)


def test_shipped_kserve_pb2_matches_kserve_proto(tmp_path: Path) -> None:
    # Descriptors, not the files' text: the generated header names the protoc version, the schema does not.
    from google.protobuf import descriptor_pb2

    from edge_sdk.daemon.proto import kserve_pb2

    shipped = descriptor_pb2.FileDescriptorProto.FromString(kserve_pb2.DESCRIPTOR.serialized_pb)
    fresh = compiled(ROOT, tmp_path)
    assert fresh == shipped, (f"{PROTO} changed since kserve_pb2.py was generated; regenerate it: "
                              f"python -m grpc_tools.protoc -I. --python_out=. {PROTO}")
    # ... and the comparison sees a change: one more field makes another descriptor.
    edited = tmp_path / "edited"
    (edited / PROTO).parent.mkdir(parents=True)
    text = (ROOT / PROTO).read_text()
    (edited / PROTO).write_text(text.replace("message ServerLiveRequest {}", "message ServerLiveRequest { bool x = 1; }"))
    assert "message ServerLiveRequest {}" in text and compiled(edited, tmp_path) != shipped
