"""Helpers for typed, validated configuration read from YAML files."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, EdgeSDKError

M = TypeVar("M", bound=BaseModel)
V = TypeVar("V")


class FieldError(ValueError):
    """Raised by a cross-field (model) validator to blame one field instead of the whole model.

    ``loc`` is the key path below the model being validated (e.g. ``("sync", "broker")``), so the
    error message names that key and its line rather than "(top level)".
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        super().__init__(message)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


def _line_of(node: yaml.Node | None, loc: tuple[object, ...]) -> int | None:
    """Walk a composed YAML node tree along a pydantic error location to find its line.

    A key that is not in the file (a missing required key) gets the line of the deepest node
    that is: the mapping it is missing from.
    """
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1 if node is not None else None


def describe_validation_error(source: str, error: ValidationError, text: str | None = None) -> str:
    """The one formatter of pydantic errors: ``source: key.path (line N): what is wrong; …``.

    Every place that validates outside input (YAML configs, profiles, desired state, manifests,
    runtime policies, broker settings) reports through here, so messages read the same
    everywhere. ``text`` (the YAML source) adds the line of each key.
    """
    root = None
    if text is not None:
        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            root = None
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        msg = item["msg"]
        blamed = item.get("ctx", {}).get("error")
        if isinstance(blamed, FieldError):
            loc, msg = loc + blamed.loc, str(blamed)
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc) if root is not None else None
        where = f"{key} (line {line})" if line else key
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_yaml_model(model: type[M], path: Path | str, text: str | None = None) -> M:
    """Parse and validate a YAML file into ``model``; every failure is a :class:`ConfigError`."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(str(path), exc, text)) from None


def json_object(payload: bytes | str, what: str, error: type[EdgeSDKError] = ConfigError) -> dict[str, Any]:
    """``payload`` parsed as a JSON object, or ``error`` saying why ``what`` is not one."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def named_values(specs: Mapping[str, V] | Sequence[str] | None, option: str, expected: str) -> list[tuple[str, V | str]]:
    """(name, value) pairs from a mapping given in code, or from a repeated CLI option's
    ``NAME=VALUE`` strings; a string with no name or no value is a ConfigError naming ``option``
    and the ``expected`` form."""
    if not specs:
        return []
    if isinstance(specs, Mapping):
        return list(specs.items())
    items: list[tuple[str, V | str]] = []
    for spec in specs:
        name, sep, value = str(spec).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{option} {spec!r}: expected {expected}")
        items.append((name.strip(), value.strip()))
    return items
