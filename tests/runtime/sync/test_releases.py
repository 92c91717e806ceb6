"""Release folders on the device: staging, atomic switch, rollback, retention, replay protection."""

from __future__ import annotations

import os
import shutil

import pytest

from edge_sdk.errors import IntegrityError, SyncError
from edge_sdk.manifest import load_manifest
from edge_sdk.runtime.sync.chunk_store import ChunkStore
from edge_sdk.runtime.sync.client import select_variants
from edge_sdk.runtime.sync.releases import ReleaseStore

PROFILE = "intel-nuc"


def _stage(store: ReleaseStore, chunks: ChunkStore, release):
    manifest = load_manifest(release)
    files = manifest.files(select_variants(manifest, PROFILE))
    for entry in files:
        data = (release / entry.path).read_bytes()
        offset = 0
        for ref in entry.chunks:
            chunks.put(ref.sha256, data[offset:offset + ref.size], ref.size)
            offset += ref.size
    return store.stage(manifest, (release / "manifest.json").read_bytes(), (release / "manifest.sig").read_bytes(),
                       files, chunks)


def test_stage_activate_rollback_cleanup(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    assert store.active() is None and store.highest_accepted("cnn") == 0
    v1 = _stage(store, chunks, sync_releases["v1"])
    assert store.active() is None  # staging never touches `current`
    assert store.activate(v1) is None
    assert os.path.islink(tmp_path / "current" / "cnn") and store.active("cnn") == store.active() == v1
    store.verify(v1)
    assert (v1 / "manifest.sig").exists()
    v2 = _stage(store, chunks, sync_releases["v2"])
    assert store.activate(v2) == v1
    assert store.active() == v2 and store.previous() == v1 and store.highest_accepted("cnn") == 2
    assert store.rollback() == v1
    assert store.active() == v1 and store.previous() is None and not v2.exists()
    assert store.highest_accepted("cnn") == 2  # a rollback does not lower the protection


def test_only_active_and_previous_are_kept(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    for name in ("v1", "v2", "v3"):
        store.activate(_stage(store, chunks, sync_releases[name]))
    assert store.cleanup() == ["cnn@v1"]
    assert sorted(p.name for p in store.releases.iterdir()) == ["cnn@v2", "cnn@v3"]
    kept = store.kept_chunks()
    assert chunks.retain_only(kept) > 0 and chunks.shas() == kept


def test_replay_protection_is_durable(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    store.activate(_stage(store, chunks, sync_releases["v2"]))
    reopened = ReleaseStore(tmp_path)
    with pytest.raises(IntegrityError, match="replay refused"):
        reopened.check_version("cnn", 1)
    reopened.check_version("cnn", 2)
    reopened.check_version("cnn", 3)


def test_only_the_previous_release_may_be_older(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    for name in ("v1", "v2", "v3"):
        store.activate(_stage(store, chunks, sync_releases[name]))
    store.check_version("cnn", 2)  # previous: a rollback the fleet may ask for
    with pytest.raises(IntegrityError, match="cnn v1 is older than v3"):
        store.check_version("cnn", 1)  # two steps back: a replay
    store.activate(store.previous("cnn"))  # back on v2, v3 now previous
    assert store.highest_accepted("cnn") == 3 and store.previous("cnn").name == "cnn@v3"
    with pytest.raises(IntegrityError, match="replay refused"):
        ReleaseStore(tmp_path).check_version("cnn", 1)


def test_crash_leftovers_are_recovered(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    v1 = _stage(store, chunks, sync_releases["v1"])
    # A crash after `current/cnn` was switched but before the version was recorded …
    os.symlink(os.path.relpath(v1, tmp_path / "current"), tmp_path / "current" / "cnn")
    # … and one mid-staging and one mid-link-write.
    (store.staging / "cnn@v2.abc").mkdir()
    (store.staging / "cnn@v2.abc" / "half.onnx").write_bytes(b"\0" * 10)
    os.symlink("../releases/nowhere", tmp_path / "current" / ".cnn.link")
    reopened = ReleaseStore(tmp_path)
    assert reopened.highest_accepted("cnn") == 1 and reopened.active("cnn") == v1
    assert list(reopened.staging.iterdir()) == [] and not (tmp_path / "current" / ".cnn.link").is_symlink()


@pytest.mark.parametrize("crash_after_rename", [False, True])
def test_single_model_layout_is_migrated(tmp_path, sync_releases, crash_after_rename):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    v1, v2 = _stage(store, chunks, sync_releases["v1"]), _stage(store, chunks, sync_releases["v2"])
    for folder in ("current", "previous"):
        (tmp_path / folder).rmdir()
    os.symlink("releases/cnn@v2", tmp_path / "current")  # the layout of earlier versions
    if crash_after_rename:  # a crash in the middle of an earlier migration
        os.symlink("releases/cnn@v1", tmp_path / ".previous.migrating")
    else:
        os.symlink("releases/cnn@v1", tmp_path / "previous")
    reopened = ReleaseStore(tmp_path)
    assert (reopened.models(), reopened.active("cnn"), reopened.previous("cnn")) == (["cnn"], v2, v1)
    assert reopened.highest_accepted("cnn") == 2 and not list(tmp_path.glob(".*.migrating"))


def test_models_are_activated_rolled_back_and_cleaned_up_independently(tmp_path, sync_releases, release_keypair):
    from edge_sdk.manifest import write_manifest
    from edge_sdk.signing import load_private_key

    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    detector = tmp_path / "src-detector"
    shutil.copytree(sync_releases["v1"], detector)
    manifest = load_manifest(detector).model_copy(update={"model": "detector"})
    write_manifest(detector, manifest, load_private_key(release_keypair[0]))
    cnn1, cnn2 = _stage(store, chunks, sync_releases["v1"]), _stage(store, chunks, sync_releases["v2"])
    det1 = _stage(store, chunks, detector)
    store.activate(det1)
    store.activate(cnn1)
    store.activate(cnn2)
    assert store.models() == ["cnn", "detector"]
    with pytest.raises(SyncError, match="several models"):
        store.active()
    assert store.cleanup("cnn") == [] and store.rollback("cnn") == cnn1
    assert (store.active("cnn"), store.active("detector")) == (cnn1, det1)  # the detector is untouched
    assert not cnn2.exists() and det1.exists()
    assert store.highest_accepted("cnn") == 2 and store.highest_accepted("detector") == 1


def test_restaging_replaces_a_damaged_release_folder(tmp_path, sync_releases):
    store, chunks = ReleaseStore(tmp_path), ChunkStore(tmp_path / "chunks")
    v1 = _stage(store, chunks, sync_releases["v1"])
    victim = next(v1.glob("onnx/*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(IntegrityError):
        store.verify(v1)
    again = _stage(store, chunks, sync_releases["v1"])
    store.verify(again)


def test_verify_requires_a_complete_variant(tmp_path, sync_releases):
    folder = tmp_path / "copy"
    shutil.copytree(sync_releases["v1"], folder)
    for path in folder.glob("onnx/*.onnx"):
        path.unlink()
    with pytest.raises(IntegrityError, match="no complete variant"):
        ReleaseStore(tmp_path / "dev").verify(folder)
