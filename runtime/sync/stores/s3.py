"""``s3://bucket/prefix``: chunks as objects ``<prefix>/<sha256>`` in any S3-compatible store (boto3).

Credentials, region and endpoint come from the usual AWS environment and config files
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for
non-AWS servers such as SeaweedFS or MinIO, ``AWS_CA_BUNDLE``). Devices read with ``GetObject``
(resuming a cut-off transfer with a ranged ``GetObject``); the cloud side probes with
``HeadObject`` and uploads with ``PutObject``. boto3 retries throttling and 5xx answers itself
(standard mode); a store that stays unreachable or refuses the credentials is a
:class:`StoreError` naming which.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from edge_sdk.errors import ConfigError, MissingDependencyError
from edge_sdk.manifest import ChunkRef
from edge_sdk.types import ErrorKind

from .base import Store, StoredChunk, StoreError, StoreOptions

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "403", "401"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Store(Store):
    scheme = "s3"

    def __init__(self, url: str, options: StoreOptions) -> None:
        super().__init__(url, options)
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"chunk store {url!r}: expected s3://bucket[/prefix]")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        try:
            import boto3
            from botocore import exceptions
            from botocore.config import Config
        except ImportError:
            raise MissingDependencyError("boto3", "s3", "the s3 chunk store") from None
        self._errors = exceptions
        config = Config(connect_timeout=options.timeout_s, read_timeout=options.timeout_s,
                        retries={"mode": "standard", "max_attempts": 1 + options.retries}, max_pool_connections=64)
        self._client = boto3.session.Session().client("s3", config=config, verify=str(options.ca_certs) if options.ca_certs else None)

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    def _translate(self, exc: Exception, what: str) -> StoreError:
        if isinstance(exc, self._errors.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING or status == "404":
                return StoreError(f"{what}: not in {self.url}", ErrorKind.CHUNK_MISSING)
            if code in _DENIED or status in ("401", "403"):
                return StoreError(f"{what}: {self.url} refused the credentials ({code or status})", ErrorKind.STORE_DENIED)
            return StoreError(f"{what}: {self.url} answered {code or status}", ErrorKind.STORE_ERROR)
        if isinstance(exc, self._errors.NoCredentialsError):
            return StoreError(f"{what}: no AWS credentials found for {self.url} (environment, ~/.aws or a role)",
                              ErrorKind.STORE_DENIED)
        return StoreError(f"{what}: {self.url} did not answer ({exc})", ErrorKind.STORE_UNREACHABLE)

    def fetch(self, ref: ChunkRef, deadline: float) -> bytes:
        what = f"chunk {ref.sha256[:12]}…"
        received = bytearray()
        attempt = 0
        while True:
            try:
                extra = {"Range": f"bytes={len(received)}-"} if received else {}
                self.counters["requests_get"] += 1
                response = self._client.get_object(Bucket=self.bucket, Key=self.key(ref.sha256), **extra)
                if received:
                    self.counters["resumes"] += 1
                for part in response["Body"].iter_chunks(64 * 1024):
                    received += part
                    if len(received) > ref.size:
                        raise StoreError(f"{what}: {self.url} holds more than the {ref.size} bytes the manifest "
                                         "lists", ErrorKind.STORE_ERROR)
                if len(received) == ref.size:
                    self.counters["chunks_fetched"] += 1
                    self.counters["bytes_received"] += ref.size
                    return bytes(received)
                raise self._errors.ReadTimeoutError(endpoint_url=self.url)
            except StoreError:
                raise
            except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
                error = self._translate(exc, what)
                if error.kind != ErrorKind.STORE_UNREACHABLE:
                    raise error from None
                attempt += 1
                self._wait_before_retry(attempt, deadline, what, exc)

    def present(self, shas: Collection[str]) -> set[str]:
        def probe(sha: str) -> str | None:
            try:
                self.counters["requests_head"] += 1
                self._client.head_object(Bucket=self.bucket, Key=self.key(sha))
                return sha
            except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
                error = self._translate(exc, f"probing {sha[:12]}…")
                if error.kind == ErrorKind.CHUNK_MISSING:
                    return None
                raise error from None

        with ThreadPoolExecutor(8) as pool:
            return {sha for sha in pool.map(probe, list(shas)) if sha is not None}

    def intact(self, chunks: Mapping[str, bytes]) -> set[str]:
        """By ``HeadObject``: a single-part upload's ETag is the MD5 of what the server stored, so
        comparing it with the local bytes' MD5 checks the content without reading it back."""
        def same(item: tuple[str, bytes]) -> str | None:
            sha, data = item
            try:
                self.counters["requests_head"] += 1
                head = self._client.head_object(Bucket=self.bucket, Key=self.key(sha))
            except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
                error = self._translate(exc, f"checking {sha[:12]}…")
                if error.kind == "chunk_missing":
                    return None
                raise error from None
            if int(head.get("ContentLength", -1)) != len(data):
                return None
            etag = str(head.get("ETag", "")).strip('"')
            if _MD5.fullmatch(etag):
                return sha if etag == hashlib.md5(data, usedforsecurity=False).hexdigest() else None
            return sha if super(S3Store, self).intact({sha: data}) else None  # multipart/SSE-KMS: no digest ETag

        with ThreadPoolExecutor(8) as pool:
            return {sha for sha in pool.map(same, chunks.items()) if sha is not None}

    def put(self, sha256: str, data: bytes) -> None:
        try:
            self.counters["requests_put"] += 1
            self._client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data,
                                    ContentType="application/octet-stream")
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise self._translate(exc, f"uploading {sha256[:12]}…") from None
        self.counters["chunks_put"] += 1
        self.counters["bytes_sent"] += len(data)

    def listing(self) -> Iterator[StoredChunk]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                self.counters["requests_list"] += 1
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix):]
                    if _SHA256.fullmatch(name):
                        yield StoredChunk(name, int(item["Size"]), item["LastModified"].timestamp())
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise self._translate(exc, "listing") from None

    def delete(self, sha256: str) -> None:
        try:
            self.counters["requests_delete"] += 1
            self._client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        except (self._errors.BotoCoreError, self._errors.ClientError) as exc:
            raise self._translate(exc, f"deleting {sha256[:12]}…") from None

    def close(self) -> None:
        self._client.close()

