"""The daemon's one config file (``edge.yaml``): typed, validated, with a commented example.

Every error names the key path and its line (via :func:`edge_sdk.config.load_yaml_model`).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..config import FieldError, StrictModel, load_yaml_model
from ..errors import EdgeSDKError
from ..profiles import AUTO
from ..runtime.acceptance import DeviceChecks
from ..runtime.sync.transport import TlsConfig
from ..types import AlignPolicy, OutboxPolicy, Precision

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class ServerTlsConfig(StrictModel):
    """TLS on a TCP listener; with ``client_ca``, only clients with a certificate it signed get in
    (mutual TLS, which then counts as authentication)."""

    cert: Path = Field(description="server certificate chain (PEM); may also hold the key")
    key: Path | None = Field(None, description="server private key (PEM), when not inside cert")
    client_ca: Path | None = Field(None, description="CA of the client certificates to require (mutual TLS)")


class HttpConfig(StrictModel):
    """The KServe v2 HTTP listener (loopback by default)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (written to state_dir/http.port)")
    unix_socket: Path | None = Field(None, description="serve on this Unix socket instead of TCP")
    tls: ServerTlsConfig | None = None


class GrpcConfig(StrictModel):
    """The KServe v2 gRPC listener (``inference.GRPCInferenceService``), beside HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=0, le=65535, description="0 picks a free port (written to state_dir/grpc.port)")
    unix_socket: Path | None = Field(None, description="serve on this Unix socket instead of TCP")
    tls: ServerTlsConfig | None = None


class MetricsAuth(str, Enum):
    TOKEN = "token"  # /metrics needs the same credentials as the API
    OPEN = "open"  # anyone who can connect may scrape


class AuthConfig(StrictModel):
    """Who may call the API. The Unix socket (its file permissions) and mutual TLS authenticate by
    themselves; otherwise each call needs a bearer token from ``tokens_file``."""

    tokens_file: Path | None = Field(None, description="bearer tokens, one per line, mode 0600 "
                                                      "(default <state_dir>/api-tokens)")
    create_tokens_file: bool = Field(True, description="create tokens_file with one random token when missing")
    anonymous_loopback: bool = Field(False, description="development only: accept calls without a token on a "
                                                        "loopback TCP listener (any local user can then call)")
    metrics: MetricsAuth = MetricsAuth.TOKEN


class ApiConfig(StrictModel):
    """What HTTP and gRPC share: authentication, browser checks, limits, timeouts, the queue."""

    auth: AuthConfig = AuthConfig()
    allowed_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call "
                                                                         "(others get 403: no CSRF)")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted besides loopback ones "
                                                                       "(others get 403: no DNS rebinding)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
                                description="larger requests (after inflating gzip/deflate) get 413")
    max_concurrent_infer: int = Field(4, ge=1, le=256, description="inferences running at once")
    max_queue: int = Field(64, ge=0, le=100_000, description="calls waiting for a slot; more get 503 + Retry-After")
    queue_timeout_s: float = Field(30.0, gt=0, le=3600, description="a call waiting longer gets 503 + Retry-After")
    max_buffered_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024,
                                    description="tensor bytes held by calls being read or waiting; more get 503")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a connection must send its request headers "
                                                                    "within this, or it is closed")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body must arrive within this (408)")
    max_connections: int = Field(1024, ge=16, le=100_000, description="open connections; beyond, idle ones are "
                                                                      "closed first")
    max_inactive_versions: int = Field(1, ge=0, le=16, description="non-active versions per model kept loaded after "
                                                                  "a call names them")


class ModelConfig(StrictModel):
    """One model served under ``name``: from a local release folder and/or kept in sync over MQTT."""

    name: str
    release: Path | None = Field(None, description="a release folder to serve until sync brings a newer one; or a "
                                                   "folder of release folders: the newest is served, every one can "
                                                   "be called by its version")
    profile: str = AUTO
    precision: str = AUTO
    backend: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        allowed = [AUTO, *(p.value for p in Precision)]
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return value

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value: str) -> str:
        from ..profiles import builtin_profiles

        # A path to a profile file is resolved and read when the model loads (as EdgeModel does).
        if value == AUTO or value.endswith((".yaml", ".yml")):
            return value
        known = list(builtin_profiles())
        if value not in known:
            raise ValueError(f"unknown device profile {value!r}; use auto, a profile .yaml file or one of {known}")
        return value

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str | None) -> str | None:
        from ..runtime.backends.base import BACKENDS

        if value is not None and value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; use one of {BACKENDS.names()}")
        return value


class StreamConfig(StrictModel):
    """One non-reference stream of a pipeline (see ``edge_sdk.runtime.align``)."""

    input: str | None = Field(None, description="model input it feeds (default: the stream's name)")
    policy: AlignPolicy = AlignPolicy.NEAREST
    tolerance_s: float | None = Field(None, ge=0)
    offset_s: float = Field(0.0, description="added to this stream's timestamps to put them on the reference clock")
    drift_ppm: float = 0.0
    reorder_window_s: float = Field(0.0, ge=0, le=60)
    max_buffer: int = Field(10_000, ge=2, le=10_000_000)


class PipelineConfig(StrictModel):
    """Local sensor streams, aligned to a reference stream, each aligned tuple run through ``model``."""

    model: str
    reference: str = Field(description="the stream that drives the output (e.g. the camera)")
    reference_input: str | None = Field(None, description="model input fed by the reference (default: its name)")
    reorder_window_s: float = Field(0.0, ge=0, le=60)
    max_wait_s: float | None = Field(1.0, ge=0, description="emit with streams marked missing after this long")
    streams: dict[str, StreamConfig] = Field(min_length=1)
    queue_size: int = Field(256, ge=1, le=100_000, description="aligned tuples waiting for the model; more are dropped")

    @model_validator(mode="after")
    def _reference_not_a_stream(self) -> PipelineConfig:
        if self.reference in self.streams:
            raise FieldError(("streams", self.reference), f"stream {self.reference!r} is both the reference and a matched stream")
        return self


class DaemonSyncConfig(StrictModel):
    """The daemon's ``sync`` section: MQTT sync with the fleet. Leave out ``broker`` to run purely offline."""

    broker: str | None = Field(None, description="mqtt://host:port or mqtts://host:port (then set tls)")
    tls: TlsConfig | None = Field(None, description="required with mqtts://")
    fleet: str = "default"
    topic_prefix: str | None = Field(None, description="defaults to edge/<fleet>")
    public_key: Path | None = Field(
        None, description="the keys releases must be signed with: a trust root (root.json, edge-sdk keys root) "
                          "or an Ed25519 public key (PEM)")
    allow_unsigned: bool = Field(False, description="serve unsigned releases (development only; without public_key)")
    telemetry_interval_s: float = Field(10.0, gt=0, le=86400)
    labels: dict[str, str] = Field(default_factory=dict, description="reported with the device's profile: what "
                                                                     "rollout groups match (e.g. site: plant1)")

    @model_validator(mode="after")
    def _check_broker(self) -> DaemonSyncConfig:
        if self.broker is None:
            if self.tls is not None:
                raise FieldError(("tls",), "tls is set but broker is not")
            return self
        from ..runtime.sync.transport import TransportConfig

        if self.broker.startswith("mqtts://") and self.tls is None:
            raise FieldError(("tls",), "sync.broker uses mqtts:// but sync.tls is not set: add sync.tls.ca "
                                       "(the CA file that signed the broker's certificate)")
        # The exact parsing the transport does at connect time, so a bad URL fails here, not later.
        try:
            TransportConfig.from_url(self.broker, client_id="config-check", tls=self.tls)
        except EdgeSDKError as exc:
            raise FieldError(("broker",), str(exc)) from None
        return self


class DaemonOutboxConfig(StrictModel):
    """The daemon's ``outbox`` section: the durable telemetry queue (SQLite file under the state dir)."""

    max_bytes: int = Field(64 * 1024 * 1024, ge=256 * 1024, description="the whole file on disk, WAL included")
    policy: OutboxPolicy = Field(OutboxPolicy.DROP_OLDEST, description="what to do when full")


class PolicyConfig(StrictModel):
    """The resource monitor and precision policy."""

    enabled: bool = True
    interval_s: float = Field(1.0, gt=0, le=3600)
    min_dwell_s: float | None = Field(None, ge=0, le=86400, description="override the profile's wait before stepping up")
    resource_root: Path | None = Field(
        None, description="read /proc and /sys below this folder instead of / (simulations and tests)")
    device_checks: DeviceChecks | None = Field(
        None, description="footprint measuring and the on-device acceptance benchmark at each activation "
                          "(default: on, 10 s budget; $EDGE_SDK_DEVICE_CHECKS=off turns them off)")


class LoggingConfig(StrictModel):
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.TEXT


#: Keys that moved to ``api:`` (shared by HTTP and gRPC); an old config still loads, with a warning
#: (a device upgraded with its old edge.yaml keeps serving), unless it sets the new key differently.
MOVED_TO_API = [("http", "max_body_bytes"), ("http", "max_concurrent_infer")]


class DaemonConfig(StrictModel):
    """Everything ``edge-sdk daemon`` needs; see :data:`EXAMPLE_YAML`."""

    _deprecations: list[str] = PrivateAttr(default_factory=list)

    device_id: str
    state_dir: Path
    api: ApiConfig = ApiConfig()
    http: HttpConfig = HttpConfig()
    grpc: GrpcConfig = GrpcConfig()
    models: list[ModelConfig] = Field(min_length=1)
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    sync: DaemonSyncConfig = DaemonSyncConfig()
    outbox: DaemonOutboxConfig = DaemonOutboxConfig()
    policy: PolicyConfig = PolicyConfig()
    logging: LoggingConfig = LoggingConfig()
    drain_timeout_s: float = Field(10.0, gt=0, le=600, description="SIGTERM: how long in-flight calls may finish")
    shutdown_timeout_s: float = Field(
        20.0, gt=0, le=900,
        description="SIGTERM: the whole shutdown (drain, HTTP server, pipelines, sync, outbox) ends within this")

    @field_validator("device_id")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _moved_keys(cls, data: Any, handler: Any) -> DaemonConfig:
        notes = []
        moved = [(section, key) for section, key in MOVED_TO_API
                 if isinstance(data, dict) and isinstance(data.get(section), dict) and key in data[section]]
        if moved:
            data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
            api = data.setdefault("api", {})
            for section, key in moved:
                value = data[section].pop(key)
                try:  # checked here, so that an error names the key the file has
                    ApiConfig.model_validate({key: value})
                except ValidationError as exc:
                    raise FieldError((section, key), exc.errors()[0]["msg"]) from None
                if isinstance(api, dict):  # (else api's own error says what is wrong with it)
                    if key in api and api[key] != value:
                        raise FieldError((section, key), f"moved to api.{key}, which is also set (to {api[key]!r}): "
                                                         f"keep only api.{key}")
                    api[key] = value
                notes.append(f"{section}.{key} is deprecated: it moved to api.{key} (read as that; move it there)")
        config = handler(data)
        config._deprecations = notes
        return config

    @property
    def deprecations(self) -> list[str]:
        """One line per deprecated key the file used (the daemon logs them as warnings)."""
        return list(self._deprecations)

    @model_validator(mode="after")
    def _cross_checks(self) -> DaemonConfig:
        names = [m.name for m in self.models]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise FieldError(("models", i, "name"), f"model names must be unique; repeated: [{name!r}]")
        for i, pipeline in enumerate(self.pipelines):
            if pipeline.model not in names:
                raise FieldError(("pipelines", i, "model"), f"pipeline for model {pipeline.model!r}, which is not "
                                                            f"configured (models: {names})")
        offline = [i for i, m in enumerate(self.models) if m.release is None]
        if offline and self.sync.broker is None:
            raise FieldError(("models", offline[0], "release"),
                             f"models {[names[i] for i in offline]} have no 'release' folder and sync.broker is not set: "
                             "nothing to serve")
        if self.grpc.enabled and self.grpc.unix_socket is not None and self.grpc.unix_socket == self.http.unix_socket:
            raise FieldError(("grpc", "unix_socket"), "must differ from http.unix_socket")
        if self.drain_timeout_s >= self.shutdown_timeout_s:
            raise FieldError(("drain_timeout_s",), f"must be less than shutdown_timeout_s ({self.shutdown_timeout_s:g}): "
                                                   "the HTTP server, sync and outbox need time to stop after the drain")
        if self.sync.public_key is None and not self.sync.allow_unsigned:
            # Local releases too: a release folder someone dropped on the device is no more trusted.
            raise FieldError(("sync", "public_key"), "releases must be signed: set sync.public_key (a root.json "
                                                     "or PEM public key), or allow_unsigned: true for development")
        return self


def load_config(path: Path | str) -> DaemonConfig:
    """Read and validate ``path``; relative paths inside are resolved against the file's folder."""
    path = Path(path)
    config = load_yaml_model(DaemonConfig, path)
    base = path.resolve().parent

    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base / p)

    updates: dict[str, object] = {}
    if not config.state_dir.is_absolute():
        updates["state_dir"] = base / config.state_dir
    def fix_profile(profile: str) -> str:
        # A profile file named relative to this config, like every other path in it.
        return str(base / profile) if profile.endswith((".yaml", ".yml")) and not Path(profile).is_absolute() else profile

    models = [m.model_copy(update={"release": fix(m.release) or m.release, "profile": fix_profile(m.profile)})
              for m in config.models]
    updates["models"] = models
    sync_updates: dict[str, object] = {}
    if config.sync.public_key is not None and not config.sync.public_key.is_absolute():
        sync_updates["public_key"] = fix(config.sync.public_key)
    if config.sync.tls is not None:
        tls = config.sync.tls
        sync_updates["tls"] = tls.model_copy(update={k: fix(getattr(tls, k)) or getattr(tls, k) for k in ("ca", "cert", "key")})
    if sync_updates:
        updates["sync"] = config.sync.model_copy(update=sync_updates)
    if config.policy.resource_root is not None and not config.policy.resource_root.is_absolute():
        updates["policy"] = config.policy.model_copy(update={"resource_root": fix(config.policy.resource_root)})
    for key in ("http", "grpc"):
        listener = getattr(config, key)
        tls = listener.tls
        if tls is not None:
            tls = tls.model_copy(update={k: fix(getattr(tls, k)) or getattr(tls, k) for k in ("cert", "key", "client_ca")})
        updates[key] = listener.model_copy(update={"unix_socket": fix(listener.unix_socket) or listener.unix_socket,
                                                   "tls": tls})
    tokens = config.api.auth.tokens_file
    tokens = (updates.get("state_dir", config.state_dir) / "api-tokens") if tokens is None else (fix(tokens) or tokens)
    updates["api"] = config.api.model_copy(update={"auth": config.api.auth.model_copy(update={"tokens_file": tokens})})
    return config.model_copy(update=updates)


EXAMPLE_YAML = """\
# edge-sdk daemon configuration. Check it with: edge-sdk config check edge.yaml
# Relative paths are resolved against this file's folder.

# This device's id in the fleet (MQTT topics use it).
device_id: pi-kitchen-01

# Where the daemon keeps synced releases, the telemetry outbox and its port file.
state_dir: /var/lib/edge-sdk

api:
  # Who may call the local API (HTTP and gRPC). TCP callers send "Authorization: Bearer <token>"
  # with a token from this file (mode 0600; created with one random token when missing). The
  # Unix sockets (their file permissions) and TLS client certificates authenticate by themselves.
  auth:
    # tokens_file: /var/lib/edge-sdk/api-tokens   # default: <state_dir>/api-tokens
    metrics: token          # token | open (let anyone who can connect scrape /metrics)
  allowed_origins: []       # browser origins allowed to call; others get 403 (no CSRF)
  allowed_hosts: []         # Host names accepted besides loopback ones (no DNS rebinding)
  max_body_bytes: 16777216  # larger requests (after inflating gzip/deflate) get 413
  max_concurrent_infer: 4   # inferences running at once
  max_queue: 64             # calls waiting for a slot; more get 503 with Retry-After
  queue_timeout_s: 30
  header_timeout_s: 10      # a connection that does not finish its headers in time is closed
  body_timeout_s: 30        # a body that does not arrive in time gets 408
  max_connections: 1024     # beyond, the connections idle longest are closed first

http:
  # KServe v2 / Open Inference Protocol over HTTP.
  host: 127.0.0.1
  port: 8080              # 0 = pick a free port, written to <state_dir>/http.port
  # unix_socket: /run/edge-sdk/api.sock   # serve on a Unix socket instead of TCP
  # tls: {cert: ./api.crt, key: ./api.key, client_ca: ./clients-ca.crt}   # client_ca = mutual TLS

grpc:
  # The same API over gRPC (inference.GRPCInferenceService, as KServe and Triton serve it).
  enabled: true
  host: 127.0.0.1
  port: 8081              # 0 = pick a free port, written to <state_dir>/grpc.port
  # unix_socket: /run/edge-sdk/grpc.sock

models:
  # Served as /v2/models/<name>. `release` is served until sync brings a newer version; it may
  # also be a folder of release folders: the newest is served, each is /v2/models/<name>/versions/<v>.
  - name: fusion
    release: ./releases/fusion
    profile: auto         # a device profile id, or auto-detect
    precision: auto       # auto lets the policy step down/up with RAM/CPU/temperature
    # backend: onnxruntime

# Optional: local sensor streams aligned to a reference stream; every aligned tuple is run
# through the model. Apps push samples to POST /v2/pipelines/<model>/streams/<stream>.
pipelines:
  - model: fusion
    reference: camera       # drives the output: one inference per camera frame
    reference_input: image  # the model input the camera frame feeds
    reorder_window_s: 0.05  # samples may arrive this late and still be used
    max_wait_s: 0.5         # a silent stream does not hold frames back longer than this
    streams:
      audio: {input: audio, policy: previous, tolerance_s: 0.2, offset_s: 0.0, reorder_window_s: 0.05}
      imu:   {input: imu, policy: nearest, tolerance_s: 0.02, offset_s: -0.013, reorder_window_s: 0.05}

sync:
  # Leave `broker` out to run offline; with it set, the daemon still starts (and serves the
  # last active release) when the broker is unreachable, and syncs once it is back.
  # broker: mqtt://192.168.1.10:1883
  # With mqtts://host:8883, TLS settings are required:
  # tls:
  #   ca: ./ca.crt          # the CA that signed the broker's certificate
  #   cert: ./device.crt    # optional: client-certificate authentication
  #   key: ./device.key
  fleet: default
  public_key: ./trust/root.json   # releases must be signed by these keys (root.json or a PEM public key)
  allow_unsigned: false   # true serves unsigned releases (development only, without public_key)
  telemetry_interval_s: 10

outbox:
  max_bytes: 67108864     # telemetry kept on disk while offline (database + WAL)
  policy: drop_oldest     # or: reject

policy:
  enabled: true           # step precision down under memory/CPU/thermal pressure and back up
  interval_s: 1.0
  # min_dwell_s: 10        # wait at least this long after a switch before stepping back up

logging:
  level: info             # debug | info | warning | error
  format: text            # text | json (one JSON object per line, for journald/Loki)

# SIGTERM/SIGINT: stop accepting calls, let in-flight ones finish for up to this long, exit 0.
drain_timeout_s: 10
# ... and finish the whole shutdown (drain, sync, outbox) within this. Keep it below systemd's
# TimeoutStopSec (30 s in deploy/systemd/edge-sdk.service).
shutdown_timeout_s: 20
"""
