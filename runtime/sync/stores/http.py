"""``http(s)://base``: chunks at ``<base>/<sha256>`` on any static server, CDN or S3 bucket URL.

A URL holding ``{sha256}`` is a template instead (``https://cdn/c/{sha256}?token=…``), for
servers that want a query string. Devices GET each chunk over pooled keep-alive connections
(urllib3), verifying the server against the fleet CA for ``https``. A transfer cut off
mid-chunk resumes where it stopped with a ``Range`` request; refused connections, timeouts,
429 and 5xx answers are retried with exponential backoff and jitter (``Retry-After`` honoured)
until the retries or the sync's deadline run out.

The cloud side probes with ``HEAD`` and uploads with ``PUT`` (nginx ``dav_methods PUT``, WebDAV
servers, or any upload endpoint); to publish into a folder a server serves, use ``file://``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

from .base import Store, StoreError, StoreOptions

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
_DENIED_STATUS = (401, 403)


class HttpStore(Store):
    scheme = "http"

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(url, options)
        import urllib3

        self._urllib3 = urllib3
        tls = {}
        if url.lower().startswith("https:"):
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(options.ca_certs) if options.ca_certs else None,
                   "cert_file": str(options.certfile) if options.certfile else None,
                   "key_file": str(options.keyfile) if options.keyfile else None}
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=64, block=False,
                                         timeout=urllib3.Timeout(connect=options.timeout_s, read=options.timeout_s),
                                         **{k: v for k, v in tls.items() if v is not None})

    def chunk_url(self, sha256: str) -> str:
        if "{sha256}" in self.url:
            return self.url.replace("{sha256}", sha256)
        return f"{self.url.rstrip('/')}/{sha256}"

    def _request(self, method: str, sha256: str, **kw):
        """One request; transport failures come back as the exception (for the retry loop)."""
        self.counters[f"requests_{method.lower()}"] += 1
        return self._pool.request(method, self.chunk_url(sha256), retries=False, redirect=True, **kw)

    # -- device side ---------------------------------------------------------------------------
    def fetch(self, ref: ChunkRef, deadline: float) -> bytes:
        what = f"chunk {ref.sha256[:12]}…"
        received = bytearray()
        attempt = 0
        while True:
            headers = {"Range": f"bytes={len(received)}-"} if received else {}
            try:
                response = self._request("GET", ref.sha256, headers=headers, preload_content=False)
                try:
                    status = response.status
                    if status in _RETRY_STATUS:
                        retry_after = response.headers.get("Retry-After", "")
                        raise _Retryable(f"HTTP {status}", float(retry_after) if retry_after.isdigit() else None)
                    self._check_status(status, what)
                    if status == 206 and received:
                        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                        if not match or int(match[1]) != len(received):
                            received.clear()  # not the range we asked for: start over
                            raise _Retryable("unexpected Content-Range")
                        self.counters["resumes"] += 1
                    elif status == 200:
                        received.clear()  # a server that ignores Range sends it all again
                    # read1: whatever has arrived, so bytes before a cut-off are kept for the resume
                    while part := response.read1(64 * 1024):
                        received += part
                        if len(received) > ref.size:
                            raise StoreError(f"{what}: {self.chunk_url(ref.sha256)} sent more than the "
                                             f"{ref.size} bytes the manifest lists", ErrorKind.STORE_ERROR)
                finally:
                    response.release_conn()
                if len(received) == ref.size:
                    self.counters["chunks_fetched"] += 1
                    self.counters["bytes_received"] += ref.size
                    return bytes(received)
                raise _Retryable(f"connection closed after {len(received)} of {ref.size} bytes")
            except StoreError:
                raise
            except _Retryable as exc:
                attempt += 1
                if exc.retry_after is not None and time.monotonic() + exc.retry_after < deadline:
                    time.sleep(min(exc.retry_after, self.options.backoff_max_s))
                self._wait_before_retry(attempt, deadline, what, exc)
            except self._urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out, TLS…
                if isinstance(exc, self._urllib3.exceptions.SSLError):
                    raise StoreError(f"{what}: TLS with {self.url} failed: {exc}", ErrorKind.STORE_UNREACHABLE) from None
                attempt += 1
                self._wait_before_retry(attempt, deadline, what, exc)

    def _check_status(self, status: int, what: str) -> None:
        if status in (200, 206):
            return
        if status == 404:
            raise StoreError(f"{what}: {self.url} has no such chunk (HTTP 404)", ErrorKind.CHUNK_MISSING)
        if status in _DENIED_STATUS:
            raise StoreError(f"{what}: {self.url} refused access (HTTP {status}): check the credentials or "
                             "the URL's token", ErrorKind.STORE_DENIED)
        raise StoreError(f"{what}: {self.url} answered HTTP {status}", ErrorKind.STORE_ERROR)

    # -- cloud side ----------------------------------------------------------------------------
    def present(self, shas: Collection[str]) -> set[str]:
        def probe(sha: str) -> str | None:
            deadline = time.monotonic() + self.options.timeout_s * (self.options.retries + 1)
            attempt = 0
            while True:
                try:
                    response = self._request("HEAD", sha)
                except self._urllib3.exceptions.HTTPError as exc:
                    attempt += 1
                    self._wait_before_retry(attempt, deadline, f"probing {sha[:12]}…", exc)
                    continue
                if response.status == 404:
                    return None
                self._check_status(response.status, f"probing {sha[:12]}…")
                return sha

        with ThreadPoolExecutor(8) as pool:
            return {sha for sha in pool.map(probe, list(shas)) if sha is not None}

    def put(self, sha256: str, data: bytes) -> None:
        deadline = time.monotonic() + self.options.timeout_s * (self.options.retries + 1)
        attempt = 0
        while True:
            try:
                response = self._request("PUT", sha256, body=data,
                                         headers={"Content-Type": "application/octet-stream"})
            except self._urllib3.exceptions.HTTPError as exc:
                attempt += 1
                self._wait_before_retry(attempt, deadline, f"uploading {sha256[:12]}…", exc)
                continue
            if response.status in (200, 201, 204):
                self.counters["chunks_put"] += 1
                self.counters["bytes_sent"] += len(data)
                return
            if response.status in _RETRY_STATUS:
                attempt += 1
                self._wait_before_retry(attempt, deadline, f"uploading {sha256[:12]}…", RuntimeError(response.status))
                continue
            self._check_status(response.status, f"uploading {sha256[:12]}…")
            raise StoreError(f"uploading {sha256[:12]}…: {self.url} answered HTTP {response.status}")

    def close(self) -> None:
        self._pool.clear()


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
