"""Desired state: which models a device (or the whole fleet) should run, and how.

A retained JSON object at ``…/desired`` (fleet) and ``…/<device>/desired`` (device)::

    {"models": {"detector":   {"version": 7, "store": "https://cdn.example.com/chunks"},
                "classifier": {"version": 3}},
     "policy": {"pin_precision": "int8"}}

Each model has its own release version and, optionally, the chunk store its chunks come from
(default: the device's configured store, else the fleet's broker). :func:`merge_desired`
combines the two levels: the union of their models, the device level's entry for a model
replacing the fleet's entry for it whole, and a device-level ``"<model>": null`` taking a fleet
model off that device; ``policy`` mappings merge key by key (nested keys too), the device level
winning. ``policy`` is a typed :class:`~edge_sdk.runtime.policy.PolicyOverride` applied to every
model without a restart. An unknown key makes the whole message a ``bad_desired`` error naming it.

The single-model form of earlier releases, ``{"model": "cnn", "version": 2}``, is still read, as
``{"models": {"cnn": {"version": 2}}}``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from edge_sdk.config import StrictModel, describe_validation_error, json_object
from edge_sdk.errors import ConfigError

from ..policy import PolicyOverride
from .stores import store_scheme
from .topics import check_level


class ModelDesired(StrictModel):
    """One model's desired release, and where its chunks come from."""

    version: int = Field(ge=1)
    store: str | None = Field(None, description="chunk store URL (mqtt, s3://…, http(s)://…, file://…)")

    @field_validator("store")
    @classmethod
    def _known_store(cls, url: str | None) -> str | None:
        if url is not None:
            try:
                store_scheme(url)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return url


class DesiredState(StrictModel):
    """What the cloud wants a device (or the whole fleet) to run. Every field is optional."""

    models: dict[str, ModelDesired | None] = Field(default_factory=dict)
    policy: PolicyOverride = PolicyOverride()

    @model_validator(mode="before")
    @classmethod
    def _single_model_form(cls, data: Any) -> Any:
        if not isinstance(data, dict) or ("model" not in data and "version" not in data):
            return data
        data = dict(data)
        model, version = data.pop("model", None), data.pop("version", None)
        if model is None or version is None:
            raise ValueError("the single-model form needs both 'model' and 'version' (or use 'models')")
        if "models" in data:
            raise ValueError("give either 'models' or the single-model 'model'/'version', not both")
        data["models"] = {model: {"version": version}}
        return data

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelDesired | None]) -> dict[str, ModelDesired | None]:
        for name in models:
            try:
                check_level(name, "model name")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return models

    @property
    def wanted(self) -> dict[str, ModelDesired]:
        """The models to run (entries that are not ``null``)."""
        return {name: entry for name, entry in self.models.items() if entry is not None}

    def with_model(self, name: str, version: int, store: str | None = None) -> DesiredState:
        """A copy with ``name``'s entry set (rollouts: read, change one model, write back)."""
        return DesiredState.model_validate({"models": {**self._models_dict(), name: {"version": version, "store": store}},
                                            "policy": self.policy.as_dict()})

    def without_model(self, name: str) -> DesiredState:
        """A copy without an entry for ``name`` at this level."""
        models = {k: v for k, v in self._models_dict().items() if k != name}
        return DesiredState.model_validate({"models": models, "policy": self.policy.as_dict()})

    def _models_dict(self) -> dict[str, dict[str, Any] | None]:
        return {k: (v.model_dump(exclude_none=True) if v is not None else None) for k, v in self.models.items()}

    @classmethod
    def from_payload(cls, payload: bytes, source: str) -> DesiredState | None:
        """Parse a desired-state message; an empty payload (cleared retained message) is None."""
        if not payload:
            return None
        data = json_object(payload, f"{source}: desired state")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(f"{source}: desired state", exc)) from None

    def to_payload(self) -> bytes:
        data: dict[str, Any] = {}
        if self.models:
            data["models"] = self._models_dict()
        policy = self.policy.as_dict()
        if policy:
            data["policy"] = policy
        return json.dumps(data, sort_keys=True).encode()


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_desired(fleet: DesiredState | None, device: DesiredState | None) -> DesiredState:
    """The models of both levels (the device's entry for a model wins whole; ``null`` removes it);
    policies merge key by key, nested keys too, the device level winning."""
    fleet = fleet or DesiredState()
    device = device or DesiredState()
    models = {name: entry for name, entry in {**fleet.models, **device.models}.items() if entry is not None}
    policy = PolicyOverride.model_validate(_deep_merge(fleet.policy.as_dict(), device.policy.as_dict()))
    return DesiredState(models=models, policy=policy)
