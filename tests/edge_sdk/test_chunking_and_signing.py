from __future__ import annotations

import os

import numpy as np
import pytest

from edge_sdk.chunking import MAX_CHUNK, MIN_CHUNK, chunk_bytes, cut_points
from edge_sdk.errors import ConfigError, IntegrityError
from edge_sdk.signing import generate_keypair, load_private_key, load_public_key, sign, verify


def test_chunks_cover_data_and_respect_bounds():
    data = os.urandom(3_000_000)
    chunks = chunk_bytes(data)
    assert b"".join(data[c.offset : c.offset + c.size] for c in chunks) == data
    assert all(MIN_CHUNK <= c.size <= MAX_CHUNK for c in chunks[:-1])
    assert 10 < len(chunks) < 3_000_000 // MIN_CHUNK


def test_local_edit_changes_few_chunks():
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 4_000_000, dtype=np.uint8).tobytes())
    before = {c.sha256 for c in chunk_bytes(bytes(data))}
    data[2_000_000:2_000_100] = bytes(100)  # overwrite 100 bytes in the middle
    data[3_000_000:3_000_000] = b"inserted"  # and shift everything after by 8 bytes
    after = chunk_bytes(bytes(data))
    changed = [c for c in after if c.sha256 not in before]
    assert 1 <= len(changed) <= 4, len(changed)


def test_small_and_empty_inputs():
    assert cut_points(b"") == []
    assert cut_points(b"abc") == [3]
    assert [c.size for c in chunk_bytes(b"x" * (MAX_CHUNK * 3))] == [MAX_CHUNK] * 3


def test_sign_and_verify_roundtrip(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k.pem")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    signature = sign(b"manifest", load_private_key(priv))
    verify(b"manifest", signature, load_public_key(pub))
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify(b"manifest!", signature, load_public_key(pub))
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(priv)
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private_key(tmp_path / "bad.pem")
