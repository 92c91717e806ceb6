"""The content-addressed chunk store: verified, crash-safe writes; verified reassembly."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.chunking import chunk_bytes, sha256_bytes
from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import ChunkRef, FileEntry
from edge_sdk.runtime.sync.chunk_store import ChunkStore


def _entry(data: bytes, path: str = "model.onnx") -> FileEntry:
    chunks = [ChunkRef(sha256=c.sha256, size=c.size) for c in chunk_bytes(data)]
    return FileEntry(path=path, size=len(data), sha256=sha256_bytes(data), chunks=chunks)


@pytest.fixture
def blob() -> bytes:
    return np.random.default_rng(3).integers(0, 256, 600_000, dtype=np.uint8).tobytes()


def _fill(store: ChunkStore, data: bytes, entry: FileEntry) -> None:
    offset = 0
    for ref in entry.chunks:
        store.put(ref.sha256, data[offset:offset + ref.size], ref.size)
        offset += ref.size


def test_put_checks_hash_and_size_and_dedups(tmp_path):
    store = ChunkStore(tmp_path)
    sha = sha256_bytes(b"hello")
    assert store.put(sha, b"hello", 5) is True
    assert store.put(sha, b"hello", 5) is False  # content-addressed: stored once
    assert store.get(sha) == b"hello" and store.has(sha)
    with pytest.raises(IntegrityError, match="does not hash"):
        store.put(sha256_bytes(b"other"), b"hello")
    with pytest.raises(IntegrityError, match="5 bytes, manifest says 6"):
        store.put(sha, b"hello", 6)
    assert store.shas() == {sha}
    with pytest.raises(IntegrityError):
        store.path("../../etc/passwd")


def test_missing_is_distinct_and_ordered(tmp_path):
    store = ChunkStore(tmp_path)
    a, b = sha256_bytes(b"a"), sha256_bytes(b"b")
    store.put(a, b"a")
    refs = [ChunkRef(sha256=b, size=1), ChunkRef(sha256=a, size=1), ChunkRef(sha256=b, size=1)]
    assert [r.sha256 for r in store.missing(refs)] == [b]


def test_assemble_reproduces_the_file(tmp_path, blob):
    entry = _entry(blob)
    assert len(entry.chunks) > 3
    store = ChunkStore(tmp_path / "chunks")
    _fill(store, blob, entry)
    store.assemble(entry, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == blob


def test_corrupt_stored_chunk_is_detected_and_removed(tmp_path, blob):
    entry = _entry(blob)
    store = ChunkStore(tmp_path / "chunks")
    _fill(store, blob, entry)
    victim = entry.chunks[2].sha256
    path = store.path(victim)
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match="corrupt; removed"):
        store.assemble(entry, tmp_path / "out.bin")
    assert not store.has(victim) and len(store.missing(entry.chunks)) == 1


def test_chunk_list_larger_than_declared_size_is_refused(tmp_path, blob):
    entry = _entry(blob)
    store = ChunkStore(tmp_path / "chunks")
    _fill(store, blob, entry)
    extra = sha256_bytes(b"x" * 100)
    store.put(extra, b"x" * 100)
    lying = entry.model_copy(update={"chunks": entry.chunks + [ChunkRef(sha256=extra, size=100)]})
    with pytest.raises(IntegrityError, match="add up to"):
        store.assemble(lying, tmp_path / "out.bin")


def test_leftover_partial_writes_are_cleaned_on_open(tmp_path):
    store = ChunkStore(tmp_path)
    sha = sha256_bytes(b"abc")
    part = store.path(sha).with_name(sha + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"ab")  # what a kill -9 mid-write leaves
    store = ChunkStore(tmp_path)
    assert not part.exists() and not store.has(sha)


def test_retain_only(tmp_path):
    store = ChunkStore(tmp_path)
    keep, drop = sha256_bytes(b"k"), sha256_bytes(b"d")
    store.put(keep, b"k")
    store.put(drop, b"d")
    assert store.retain_only({keep}) == 1
    assert store.shas() == {keep} and store.bytes_used() == 1
