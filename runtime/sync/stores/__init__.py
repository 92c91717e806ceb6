"""Chunk stores, one module each, found by URL scheme: ``mqtt`` (retained messages on the fleet's
broker, the embedded default for small fleets), ``s3://bucket/prefix`` (any S3 API, boto3),
``http(s)://base`` (any static server or CDN serving ``<base>/<sha256>``) and ``file:///dir``
(a folder, e.g. the one nginx serves or a mounted bucket).

    store = open_store("https://cdn.example.com/chunks", StoreOptions(ca_certs=Path("fleet-ca.pem")))
    data = store.fetch(ref, deadline)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from edge_sdk.errors import ConfigError
from edge_sdk.registry import Registry

from .base import DEFAULT_MAX_MESSAGE_BYTES, Store, StoreError, StoreOptions

STORES: Registry[type[Store]] = Registry("chunk store")
STORES.register_lazy("mqtt", "edge_sdk.runtime.sync.stores.mqtt:MqttStore")
STORES.register_lazy("s3", "edge_sdk.runtime.sync.stores.s3:S3Store")
STORES.register_lazy("http", "edge_sdk.runtime.sync.stores.http:HttpStore")
STORES.register_lazy("https", "edge_sdk.runtime.sync.stores.http:HttpStore")
STORES.register_lazy("file", "edge_sdk.runtime.sync.stores.file:FileStore")

MQTT_STORE = "mqtt"  # the fleet's own broker: no URL beyond the scheme


def store_scheme(url: str) -> str:
    """The registry name of ``url`` (``mqtt`` alone means the fleet's broker); ConfigError if unknown."""
    scheme = "mqtt" if url in ("mqtt", "mqtt:") else urlsplit(url).scheme.lower()
    if scheme not in STORES:
        raise ConfigError(f"chunk store {url!r}: unknown scheme {scheme or '(none)'!r} (known: {', '.join(STORES.names())})")
    return scheme


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """The store named by ``url``."""
    return STORES.get(store_scheme(url))(url, options or StoreOptions())


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "MQTT_STORE", "STORES", "Store", "StoreError", "StoreOptions", "open_store",
           "store_scheme"]
