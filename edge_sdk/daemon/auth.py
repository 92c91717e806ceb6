"""Who may call the local API: bearer tokens from a 0600 file, mutual TLS, Unix socket permissions;
and the browser checks (Origin, Host) that keep a web page from reaching a loopback API.

A connection is authenticated by its transport when it comes over the Unix socket (the socket
file's permissions decide who can connect) or over TLS with a client certificate the configured
CA signed; otherwise a request needs ``Authorization: Bearer <token>`` with a token listed in the
tokens file (one per line, ``#`` comments). The file is re-read when it changes (it is looked at
once a second), so a token is rotated without a restart.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import ssl
import stat
import time
from pathlib import Path

from ..errors import ConfigError
from .config import ApiConfig, ServerTlsConfig
from .kserve import ApiError, Status

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
#: The tokens file is looked at (stat) at most this often: a rotated token works within a second.
_RECHECK_S = 1.0


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_tokens_file(path: Path, create: bool) -> None:
    """Check the tokens file is private (like ssh's keys); create it with one token if allowed."""
    if not path.exists():
        if not create:
            raise ConfigError(f"api.auth.tokens_file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# edge-sdk API bearer tokens, one per line (send: Authorization: Bearer <token>)\n")
            f.write(secrets.token_urlsafe(32) + "\n")
        log.warning("created %s with a new API token (readable by this user only)", path)
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"api.auth.tokens_file {path} is accessible to other users (mode {stat.S_IMODE(mode):04o}): "
                          f"chmod 600 {path}")


class Authenticator:
    """Checks one request's credentials; shared by HTTP and gRPC."""

    def __init__(self, config: ApiConfig, tokens_file: Path | None) -> None:
        self.config = config
        self.tokens_file = tokens_file
        self._stamp: tuple[int, int] | None = None
        self._digests: set[bytes] = set()
        self._checked_at = -math.inf

    def _tokens(self) -> set[bytes]:
        if self.tokens_file is None:
            return set()
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_S:  # a stat() per call is measurable on small devices
            return self._digests
        self._checked_at = now
        try:
            st = self.tokens_file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                lines = self.tokens_file.read_text().splitlines()
                self._digests = {hashlib.sha256(t.strip().encode()).digest() for t in lines
                                 if t.strip() and not t.lstrip().startswith("#")}
                self._stamp = stamp
        except OSError as exc:  # keep the last good set: a rotation in progress must not lock everyone out
            log.error("cannot read api.auth.tokens_file %s: %s", self.tokens_file, exc)
        return self._digests

    def check(self, authorization: str | None, *, transport_authenticated: bool, loopback: bool) -> None:
        """Raise UNAUTHENTICATED unless the transport or the bearer token vouches for the caller."""
        if transport_authenticated or (loopback and self.config.auth.anonymous_loopback):
            return
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                digest = hashlib.sha256(token.strip().encode()).digest()
                if any(hmac.compare_digest(digest, d) for d in self._tokens()):
                    return
                raise ApiError(Status.UNAUTHENTICATED, "the bearer token is not valid")
        raise ApiError(Status.UNAUTHENTICATED, "authentication required: send 'Authorization: Bearer <token>' "
                                               "(a token from api.auth.tokens_file), or use the Unix socket or a "
                                               "TLS client certificate")

    def check_browser(self, origin: str | None, fetch_site: str | None, host: str | None, loopback: bool) -> None:
        """Refuse what a web page could send: a foreign Origin (CSRF), and on a loopback listener a
        Host that is not a loopback name (DNS rebinding)."""
        allowed = self.config.allowed_origins
        if origin is not None and origin not in allowed:
            raise ApiError(Status.PERMISSION_DENIED, f"cross-origin request from {origin!r} refused "
                                                     "(list it in api.allowed_origins to allow it)")
        if origin is None and fetch_site in ("cross-site", "same-site"):
            raise ApiError(Status.PERMISSION_DENIED, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})")
        if host is None:
            return
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.startswith("[") and "]" in name:
            name = name[1:name.index("]")]
        hosts = self.config.allowed_hosts
        if (loopback and not is_loopback(name) and name not in hosts) or (not loopback and hosts and name not in hosts):
            raise ApiError(Status.PERMISSION_DENIED, f"Host {host!r} is not a name of this API "
                                                     "(list it in api.allowed_hosts to allow it)")


def server_ssl_context(tls: ServerTlsConfig) -> ssl.SSLContext:
    """TLS for the HTTP listener; with ``client_ca``, a client certificate it signed is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
        if tls.client_ca is not None:
            context.load_verify_locations(str(tls.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate/key/client_ca cannot be used: {exc}") from None
    return context
