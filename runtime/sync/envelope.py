"""Wire format of a release manifest on MQTT: the exact manifest bytes plus their release statement.

One retained message at ``…/releases/<model>/<version>/manifest`` carries both, so a device can
never see a manifest without the statement it was published with (two topics could be updated
at different moments). The frame is binary and fixed so that the statement can be checked
*before* any parser touches the manifest bytes::

    b"EDGEMAN2" | statement length (4 bytes, big-endian; 0 = unsigned) | statement | manifest.json bytes

The statement is ``manifest.sig``: TUF targets metadata with signatures by key id, an expiry and
the sha256 of the manifest bytes (:mod:`edge_sdk.trust`). :func:`open_envelope` only slices bytes;
:func:`verify_envelope` checks the statement against the trusted keys and the manifest bytes
against the statement, and only then hands them to the JSON/pydantic parser.
"""

from __future__ import annotations

import struct

from edge_sdk.errors import IntegrityError
from edge_sdk.manifest import Manifest, verify_manifest_bytes
from edge_sdk.trust import MAX_STATEMENT_BYTES, TrustRoot

MAGIC = b"EDGEMAN2"
_HEADER = struct.Struct(">8sI")
_MAX_SIGNATURE = MAX_STATEMENT_BYTES


def seal(manifest_bytes: bytes, signature: bytes | None) -> bytes:
    """Frame ``manifest_bytes`` and their release statement (None for an unsigned release)."""
    signature = signature or b""
    if len(signature) > _MAX_SIGNATURE:
        raise IntegrityError(f"release statement of {len(signature)} bytes is too long")
    return _HEADER.pack(MAGIC, len(signature)) + signature + manifest_bytes


def open_envelope(payload: bytes) -> tuple[bytes, bytes | None]:
    """Split a frame into (manifest bytes, signature or None) without parsing the manifest."""
    if len(payload) < _HEADER.size:
        raise IntegrityError(f"manifest message of {len(payload)} bytes is too short to be a release envelope")
    magic, sig_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise IntegrityError("manifest message does not start with the release envelope marker")
    if sig_len > _MAX_SIGNATURE or _HEADER.size + sig_len > len(payload):
        raise IntegrityError(f"manifest message declares a {sig_len}-byte statement it does not hold")
    start = _HEADER.size + sig_len
    signature = payload[_HEADER.size:start] or None
    return payload[start:], signature


def verify_envelope(payload: bytes, trust: TrustRoot | None) -> tuple[Manifest, bytes, bytes | None]:
    """Check the frame and statement, then parse: returns (manifest, manifest bytes, statement).

    With ``trust`` None nothing is checked (only for fleets that opted out of signing); with a
    root an unsigned, wrongly signed, mismatched or expired release raises :class:`IntegrityError`
    before the manifest parser runs.
    """
    data, signature = open_envelope(payload)
    manifest = verify_manifest_bytes(data, signature, trust, allow_expired=False)
    return manifest, data, signature
