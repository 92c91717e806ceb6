"""Wire format of a release manifest on MQTT: the exact manifest bytes plus their signature.

One retained message at ``…/releases/<model>/<version>/manifest`` carries both, so a device can
never see a manifest without the signature it was published with (two topics could be updated
at different moments). The frame is binary and fixed so that the signature can be checked
*before* any parser touches the manifest bytes::

    b"EDGEMAN1" | signature length (2 bytes, big-endian; 0 = unsigned) | signature | manifest.json bytes

:func:`open_envelope` only slices bytes; :func:`verify_envelope` checks the Ed25519 signature over
the manifest bytes and only then hands them to the JSON/pydantic parser.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import Manifest, verify_manifest_bytes

MAGIC = b"EDGEMAN1"
_HEADER = struct.Struct(">8sH")
_MAX_SIGNATURE = 512  # Ed25519 signatures are 64 bytes; anything far larger is garbage


def seal(manifest_bytes: bytes, signature: bytes | None) -> bytes:
    """Frame ``manifest_bytes`` and their detached signature (None for an unsigned release)."""
    signature = signature or b""
    if len(signature) > _MAX_SIGNATURE:
        raise IntegrityError(f"signature of {len(signature)} bytes is too long")
    return _HEADER.pack(MAGIC, len(signature)) + signature + manifest_bytes


def open_envelope(payload: bytes) -> tuple[bytes, bytes | None]:
    """Split a frame into (manifest bytes, signature or None) without parsing the manifest."""
    if len(payload) < _HEADER.size:
        raise IntegrityError(f"manifest message of {len(payload)} bytes is too short to be a release envelope")
    magic, sig_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise IntegrityError("manifest message does not start with the release envelope marker")
    if sig_len > _MAX_SIGNATURE or _HEADER.size + sig_len > len(payload):
        raise IntegrityError(f"manifest message declares a {sig_len}-byte signature it does not hold")
    start = _HEADER.size + sig_len
    signature = payload[_HEADER.size:start] or None
    return payload[start:], signature


def verify_envelope(payload: bytes, public_key: Ed25519PublicKey | None) -> tuple[Manifest, bytes, bytes | None]:
    """Check the frame and signature, then parse: returns (manifest, manifest bytes, signature).

    With ``public_key`` None the signature is not checked (only for fleets that opted out of
    signing); with a key an unsigned or wrongly signed manifest raises :class:`IntegrityError`
    before the manifest parser runs.
    """
    data, signature = open_envelope(payload)
    manifest = verify_manifest_bytes(data, signature, public_key)
    return manifest, data, signature
