"""Write desired state for a whole fleet or one device (retained, so devices get it on connect).

Desired state lists models (see :mod:`edge_sdk.runtime.sync.desired`); :func:`update_desired`
changes one model's entry and keeps the others, by reading the retained state and writing it
back (a concurrent writer of the same level in between loses its change: rollouts of one device
are serialized by their own state).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edge_sdk.config import describe_validation_error
from edge_sdk.errors import ConfigError, SyncError
from edge_sdk.runtime.sync.topics import Topics
from edge_sdk.runtime.sync.transport import TlsConfig
from edge_sdk.runtime.sync.twin import DesiredState

from .connection import collect_retained, connect


def build_desired(model: str | None = None, version: int | None = None, policy: dict[str, Any] | None = None,
                  store: str | None = None, base: DesiredState | None = None) -> DesiredState:
    """``base`` (default: empty) with ``model`` set to ``version`` (and ``store``) and ``policy``
    merged over its policy; validated."""
    if (version is not None or store is not None) and model is None:
        raise ConfigError("a desired version or store needs --model")
    if model is not None and version is None:
        raise ConfigError(f"--model {model} needs --version")
    base = base or DesiredState()
    try:
        state = base.with_model(model, version, store) if model is not None else base
        if policy:
            state = DesiredState(models=state.models, policy={**state.policy.as_dict(), **policy})
        return state
    except ValidationError as exc:
        raise ConfigError(describe_validation_error("desired state", exc)) from None


def read_desired(broker: str, fleet: str, *, device: str | None = None, prefix: str = "",
                 tls: TlsConfig | None = None) -> DesiredState | None:
    """The retained desired state at the device (or fleet) level; None if there is none."""
    topics = Topics(fleet, prefix)
    topic = topics.desired(device)
    with connect(broker, "desire", tls) as transport:
        payload = collect_retained(transport, topics, topic).get(topic, b"")
    return DesiredState.from_payload(payload, topic)


def write_desired(broker: str, fleet: str, state: DesiredState | None, *, device: str | None = None,
                  prefix: str = "", tls: TlsConfig | None = None) -> str:
    """Publish ``state`` retained at the device (or fleet) desired topic; None clears it. Returns the topic."""
    topic = Topics(fleet, prefix).desired(device)
    payload = state.to_payload() if state is not None else b""
    with connect(broker, "desire", tls) as transport:
        if not transport.publish(topic, payload, qos=1, retain=True, wait=30.0):
            raise SyncError(f"broker did not acknowledge desired state at {topic}")
    return topic
