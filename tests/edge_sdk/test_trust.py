"""Release trust on TUF metadata: key ids, thresholds, mix-and-match, expiry, rotation, revocation."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import load_manifest, verify_manifest_bytes
from edge_sdk.signing import generate_keypair, load_private_key, load_public_key
from edge_sdk.trust import TrustRoot, key_id, load_trust, new_root, rotate_root, sign_release


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple]:
    """name -> (private key, public key, keyid) for root and release keys."""
    out = {}
    for name in ("root1", "root2", "rel1", "rel2", "rel3"):
        priv, pub = generate_keypair(tmp_path / f"{name}.key")
        out[name] = (load_private_key(priv), load_public_key(pub), key_id(load_public_key(pub)), priv, pub)
    return out


def manifest_bytes(version: int = 3, model: str = "cnn") -> bytes:
    return json.dumps({"model": model, "version": version, "source_sha256": "0" * 64, "variants": []}).encode()


def test_a_release_is_trusted_by_key_id_and_threshold(keys) -> None:
    root = TrustRoot.from_bytes(new_root([keys["root1"][0]], [keys["rel1"][1], keys["rel2"][1]], release_threshold=2),
                                "root.json")
    data = manifest_bytes()
    both = sign_release(data, [keys["rel1"][0], keys["rel2"][0]])
    trust = root.verify_release(both, data)
    assert trust.keyids == tuple(sorted([keys["rel1"][2], keys["rel2"][2]])) and not trust.expired
    assert json.loads(both)["signatures"][0]["keyid"] in trust.keyids  # signatures carry their key id
    with pytest.raises(IntegrityError, match="1 valid signature.*2 needed"):
        root.verify_release(sign_release(data, [keys["rel1"][0]]), data)
    with pytest.raises(IntegrityError, match="0 valid"):  # a key the root does not list
        root.verify_release(sign_release(data, [keys["rel3"][0], keys["root1"][0]]), data)


def test_statements_bind_the_exact_manifest_and_its_version(keys) -> None:
    root = TrustRoot.from_public_key(keys["rel1"][1])
    v3, v4 = manifest_bytes(3), manifest_bytes(4)
    st3 = sign_release(v3, [keys["rel1"][0]])
    with pytest.raises(IntegrityError, match="does not match"):  # mix-and-match: v3's statement, v4's manifest
        root.verify_release(st3, v4)
    with pytest.raises(IntegrityError, match="not TUF metadata"):
        root.verify_release(b"\x00" * 64, v3)  # an old raw Ed25519 signature
    assert verify_manifest_bytes(v3, st3, keys["rel1"][1]).version == 3  # a bare public key is a one-key root


def test_an_expired_statement_is_refused_for_activation_but_serves(keys) -> None:
    root = TrustRoot.from_public_key(keys["rel1"][1])
    data = manifest_bytes()
    stale = sign_release(data, [keys["rel1"][0]], expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(IntegrityError, match="expired.*frozen or replayed"):
        verify_manifest_bytes(data, stale, root, allow_expired=False)
    assert verify_manifest_bytes(data, stale, root).version == 3  # installed releases keep serving
    assert root.verify_release(stale, data, allow_expired=True).report()["expired"] is True


def test_rotation_and_revocation_by_a_root_signed_with_the_old_key(keys, tmp_path: Path) -> None:
    v1 = new_root([keys["root1"][0]], [keys["rel1"][1]])
    root1 = TrustRoot.from_bytes(v1, "v1")
    # v2: root2 replaces root1, rel2 replaces rel1 (compromised); signed by the old and the new root key
    v2 = rotate_root(v1, [keys["root1"][0], keys["root2"][0]], add_release=[keys["rel2"][1]],
                     add_root=[keys["root2"][1]], revoke=[keys["root1"][2], keys["rel1"][2]])
    root2 = root1.rotate(v2)
    assert root2.version == 2 and root2.keyids() == [keys["rel2"][2]]
    data = manifest_bytes()
    assert root2.verify_release(sign_release(data, [keys["rel2"][0]]), data).root_version == 2
    with pytest.raises(IntegrityError, match="0 valid"):
        root2.verify_release(sign_release(data, [keys["rel1"][0]]), data)  # revoked
    # what a device must refuse: a root the old root keys did not sign, one the new keys did not
    # sign, a skipped version, a replayed old root
    forged = rotate_root(v1, [keys["rel1"][0]], add_release=[keys["rel3"][1]])
    with pytest.raises(IntegrityError, match="current root keys"):
        root1.rotate(forged)
    unsigned_new = rotate_root(v1, [keys["root1"][0]], add_root=[keys["root2"][1]], revoke=[keys["root1"][2]])
    with pytest.raises(IntegrityError, match="new root keys"):
        root1.rotate(unsigned_new)
    with pytest.raises(IntegrityError, match="does not follow"):
        root1.rotate(rotate_root(v2, [keys["root2"][0]]))
    with pytest.raises(IntegrityError, match="does not follow"):
        root2.rotate(v1)


def test_keys_cli_writes_a_root_devices_load_and_rotates_it(keys, tmp_path: Path, capsys) -> None:
    def run(*args: str) -> None:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        assert done.value.code == 0

    k = {name: (str(v[3]), str(v[4])) for name, v in keys.items()}
    run("keys", "root", str(tmp_path / "root.json"), "--root-key", k["root1"][0], "--release-key", k["rel1"][1])
    run("keys", "id", k["rel2"][1])
    assert capsys.readouterr().out.strip().splitlines()[-1] == keys["rel2"][2]
    run("keys", "rotate", str(tmp_path / "root.json"), str(tmp_path / "root.v2.json"), "--sign-key", k["root1"][0],
        "--add-release-key", k["rel2"][1], "--revoke", keys["rel1"][2])
    v1, v2 = load_trust(tmp_path / "root.json"), load_trust(tmp_path / "root.v2.json")
    assert (v1.keyids(), v2.keyids()) == ([keys["rel1"][2]], [keys["rel2"][2]])
    assert v1.rotate(v2.to_bytes()).version == 2
    with pytest.raises(SystemExit) as refused:  # a rotation signed by a non-root key is never written
        main(["keys", "rotate", str(tmp_path / "root.json"), str(tmp_path / "bad.json"), "--sign-key", k["rel3"][0]])
    assert refused.value.code == 1 and not (tmp_path / "bad.json").exists()


def test_converted_releases_carry_statements_a_root_json_verifies(cnn_release: Path, release_keypair, tmp_path) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(new_root([load_private_key(release_keypair[0])], [load_public_key(release_keypair[1])]))
    assert load_manifest(cnn_release, load_trust(root)).model == "cnn"
    statement = json.loads((cnn_release / "manifest.sig").read_bytes())
    assert statement["signed"]["_type"] == "targets" and list(statement["signed"]["targets"]) == ["cnn/v1/manifest.json"]


# --- roots delivered over the network (TrustStore) --------------------------------------------

def _chain(keys) -> list[bytes]:
    """Roots v1..v3: v2 swaps the root key root1 → root2 and adds rel2; v3 revokes rel1."""
    v1 = new_root([keys["root1"][0]], [keys["rel1"][1]])
    v2 = rotate_root(v1, [keys["root1"][0], keys["root2"][0]], add_release=[keys["rel2"][1]],
                     add_root=[keys["root2"][1]], revoke=[keys["root1"][2]])
    v3 = rotate_root(v2, [keys["root2"][0]], revoke=[keys["rel1"][2]])
    return [v1, v2, v3]


def test_a_trust_store_takes_roots_in_any_order_and_persists_each(keys, tmp_path: Path) -> None:
    from edge_sdk.trust import TrustStore

    v1, v2, v3 = _chain(keys)
    store = TrustStore(TrustRoot.from_bytes(v1, "configured"), tmp_path / "trust")
    assert store.offer(v3, "v3") is False and store.current.version == 1  # waits for v2
    assert store.offer(v2, "v2") is True and store.current.version == 3  # then takes both
    assert store.current.keyids() == [keys["rel2"][2]]
    assert sorted(p.name for p in (tmp_path / "trust").iterdir()) == ["root.2.json", "root.3.json"]
    assert store.offer(v1, "replayed") is False and store.current.version == 3
    # A restart re-walks the chain from the configured root through the files kept on disk.
    again = TrustStore(TrustRoot.from_bytes(v1, "configured"), tmp_path / "trust")
    assert again.current.version == 3 and again.current.to_bytes() == store.current.to_bytes()


def test_a_trust_store_refuses_roots_off_the_chain_even_from_its_own_folder(keys, tmp_path: Path) -> None:
    from edge_sdk.trust import TrustStore

    v1, v2, _ = _chain(keys)
    forged = rotate_root(v1, [keys["rel1"][0]], add_release=[keys["rel3"][1]])  # a release key posing as root
    store = TrustStore(TrustRoot.from_bytes(v1, "configured"), tmp_path / "trust")
    assert store.offer(forged, "forged") is False and store.current.version == 1
    assert "current root keys" in store.refused[2]
    assert store.offer(b"{not json", "garbage") is False and "not TUF metadata" in store.refused[0]
    assert not (tmp_path / "trust").exists()  # nothing refused is written
    # Someone swaps a forged v2 into the folder: at the next start it is refused, v1 stays.
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "root.2.json").write_bytes(forged)
    restarted = TrustStore(TrustRoot.from_bytes(v1, "configured"), tmp_path / "trust")
    assert restarted.current.version == 1 and 2 in restarted.refused
    assert restarted.offer(v2, "v2") and restarted.current.version == 2  # the real v2 still gets through
    # A lone pinned public key cannot be rotated from the network.
    pinned = TrustStore(TrustRoot.from_public_key(keys["rel1"][1]))
    assert pinned.offer(v2, "v2") is False and "pins a single public key" in pinned.refused[2]
