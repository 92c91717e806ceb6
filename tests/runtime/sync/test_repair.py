"""Re-assembling a damaged release folder from the device's chunk store (issue 15, class 4)."""

from __future__ import annotations

import shutil

import pytest

from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import load_manifest, verify_file
from edge_sdk.runtime.sync.chunk_store import ChunkStore
from edge_sdk.runtime.sync.releases import ReleaseStore
from edge_sdk.runtime.sync.repair import repair_release
from edge_sdk.trust import load_trust


def stored(release, root) -> ChunkStore:
    """The chunk store a sync of ``release`` leaves behind."""
    chunks = ChunkStore(root)
    for entry in load_manifest(release).files():
        data = (release / entry.path).read_bytes()
        offset = 0
        for ref in entry.chunks:
            chunks.put(ref.sha256, data[offset:offset + ref.size], ref.size)
            offset += ref.size
    return chunks


def test_a_damaged_or_deleted_file_is_rebuilt_from_local_chunks(sync_releases, release_keypair, tmp_path):
    release = tmp_path / "cnn@v1"
    shutil.copytree(sync_releases["v1"], release)
    chunks = stored(release, tmp_path / "chunks")
    files = load_manifest(release).files()
    victim = next(e for e in files if e.path.endswith(".onnx"))
    data = bytearray((release / victim.path).read_bytes())
    data[len(data) // 2] ^= 0x01
    (release / victim.path).write_bytes(bytes(data))
    deleted = files[-1]
    (release / deleted.path).unlink()
    report = repair_release(release, chunks, load_trust(release_keypair[1]))
    assert sorted(report.repaired) == sorted([victim.path, deleted.path]) and report.complete
    for entry in files:
        verify_file(release, entry)
    ReleaseStore(tmp_path / "store").verify(release)  # the folder is a complete release again


def test_what_cannot_be_rebuilt_is_named_for_a_refetch(sync_releases, tmp_path):
    release = tmp_path / "cnn@v1"
    shutil.copytree(sync_releases["v1"], release)
    chunks = stored(release, tmp_path / "chunks")
    victim = max(load_manifest(release).files(), key=lambda e: e.size)
    (release / victim.path).write_bytes(b"\0" * victim.size)
    lost, bad = victim.chunks[0], victim.chunks[-1]
    chunks.path(lost.sha256).unlink()
    chunks.path(bad.sha256).write_bytes(b"rot" * 10)  # a stored chunk gone bad is found and dropped
    report = repair_release(release, chunks)
    assert report.unrepaired == [victim.path] and not report.complete
    assert {r.sha256 for r in report.missing} == {lost.sha256, bad.sha256}
    assert not chunks.has(bad.sha256) and not list(release.rglob("*.repair"))


def test_a_manifest_edited_on_disk_cannot_steer_a_repair(sync_releases, release_keypair, tmp_path):
    release = tmp_path / "cnn@v1"
    shutil.copytree(sync_releases["v1"], release)
    chunks = stored(release, tmp_path / "chunks")
    text = (release / "manifest.json").read_text()
    (release / "manifest.json").write_text(text.replace('"version": 1', '"version": 1 ', 1))
    with pytest.raises(IntegrityError, match="does not match its signed statement"):
        repair_release(release, chunks, load_trust(release_keypair[1]))
