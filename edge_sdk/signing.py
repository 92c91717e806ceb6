"""Ed25519 keys and detached signatures for release manifests."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError, IntegrityError


def generate_keypair(private_path: Path | str, public_path: Path | str | None = None) -> tuple[Path, Path]:
    """Write a new PEM private key (mode 0600) and its public key; refuses to overwrite."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"signing key {path}: no such file") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(source: Path | str | bytes) -> Ed25519PublicKey:
    """A public key from a PEM file path or PEM bytes."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        key = serialization.load_pem_public_key(data)
    except FileNotFoundError:
        raise ConfigError(f"public key {source}: no such file") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("public key: not an Ed25519 key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def verify(data: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    """Raise :class:`IntegrityError` unless ``signature`` is ``key``'s signature of ``data``."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise IntegrityError("manifest signature does not verify with the configured public key") from None
