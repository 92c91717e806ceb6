"""Write desired state for a whole fleet or one device (retained, so devices get it on connect)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edge_sdk.config import describe_validation_error
from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import TlsConfig
from edge_sdk.runtime.sync.twin import DesiredState

from .connection import connect


def build_desired(model: str | None = None, version: int | None = None,
                  policy: dict[str, Any] | None = None) -> DesiredState:
    """A validated desired state (``version`` needs ``model``)."""
    if version is not None and model is None:
        raise ConfigError("a desired version needs --model")
    try:
        return DesiredState(model=model, version=version, policy=policy or {})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("desired state", exc)) from None


def write_desired(broker: str, fleet: str, state: DesiredState | None, *, device: str | None = None,
                  prefix: str = "", tls: TlsConfig | None = None) -> str:
    """Publish ``state`` retained at the device (or fleet) desired topic; None clears it. Returns the topic."""
    topic = Topics(fleet, prefix).desired(device)
    payload = state.to_payload() if state is not None else b""
    with connect(broker, "desire", tls) as transport:
        if not transport.publish(topic, payload, qos=1, retain=True, wait=30.0):
            raise SyncError(f"broker did not acknowledge desired state at {topic}")
    return topic
