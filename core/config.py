"""One config mechanism for all of stripes: YAML + `${...}` + `key=value` onto typed dataclasses.

Every schema is a plain dataclass. `load_config` reads a YAML file, merges command-line
overrides onto it, merges the result onto `OmegaConf.structured(schema)` (so an unknown key
or a wrong type fails with its full key path), resolves interpolations and returns a real
dataclass instance. Any failure becomes a `ConfigError` whose message is one line naming the
key, the value and what is allowed; the CLI prints that line and exits nonzero.

Validation beyond types (ranges, divisibility, cross-field rules) lives beside each schema
and raises `ConfigError` too; `assert` is never used for it because `python -O` strips it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value. `str(err)` is a single line fit for the user."""

    def __init__(self, key: str, value: Any, allowed: str, reason: str = "") -> None:
        self.key, self.value, self.allowed, self.reason = key, value, allowed, reason
        what = f"{key}={value!r}" if value is not _NO_VALUE else key
        because = f": {reason}" if reason else ""
        super().__init__(f"{what}{because} (allowed: {allowed})")


_NO_VALUE = object()


def require_positive(key: str, value: float, integer: bool = False) -> None:
    """Raise unless `value` is a finite number > 0 (NaN and inf fail too)."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, value, "a positive integer" if integer else
                          "a positive finite number")


def missing_key(key: str, allowed: str) -> ConfigError:
    """Error for a required key that was not given."""
    return ConfigError(key, _NO_VALUE, allowed, "is required but missing")


def load_config(schema: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML), apply `key=value` overrides and return a typed `schema` instance."""
    layers: list[DictConfig] = []
    if path is not None:
        layers.append(read_yaml(Path(path)))
    layers.append(parse_overrides(overrides))
    return to_typed(schema, *layers, prefix="")


def to_typed(schema: type[T], *data: Any, prefix: str) -> T:
    """Merge each of `data` in turn onto `schema`, resolve the result and instantiate it;
    errors name `prefix.key`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *data)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _translate(err, schema, prefix) from None
    except (TypeError, ValueError) as err:  # omegaconf's own, for mismatched containers
        problem = str(err).splitlines()[0]
        raise ConfigError(prefix or "config", _NO_VALUE, "values shaped as the schema; to "
                          "change one item of a list, give the whole list", problem) from None


def read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(str(path), _NO_VALUE, "a path to an existing YAML file", "not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(where, _NO_VALUE, "valid YAML", f"cannot parse: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(str(path), type(raw).__name__, "a YAML mapping at the top level")
    try:
        return OmegaConf.create(raw)
    except OmegaConfBaseException as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(str(path), _NO_VALUE, "plain YAML values", problem) from None


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                "command line", item, "key=value pairs such as model.n_layers=4",
                "not a key=value override",
            )
    # Built by hand rather than by OmegaConf.from_dotlist so that integer path segments stay
    # integers: `model.overrides.3=mamba` must address the int-keyed layer map.
    tree: dict = {}
    for item in overrides:
        key, _, text = item.partition("=")
        parts = [int(p) if re.fullmatch(r"-?\d+", p) else p for p in key.split(".")]
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "invalid YAML"
            raise ConfigError(key, text, "a YAML value", problem) from None
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, text, "one value per key", "conflicts with an override")
        node[parts[-1]] = value
    try:
        return OmegaConf.create(tree)
    except OmegaConfBaseException as err:
        raise ConfigError("command line", list(overrides), "key=value pairs", str(err)) from None


def _translate(err: OmegaConfBaseException, schema: type, prefix: str) -> ConfigError:
    """Turn omegaconf's multi-line exception into our one-line ConfigError."""
    rel = getattr(err, "full_key", None) or ""
    key = ".".join(part for part in (prefix, rel) if part) or (prefix or "<root>")
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError):
        fields = _fields_at(schema, rel)
        wrong = rel.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(wrong, fields, n=1)
        reason = f"unknown key; did you mean '{close[0]}'?" if close else "unknown key"
        return ConfigError(key, _NO_VALUE, ", ".join(fields) or "no keys", reason)
    if isinstance(err, MissingMandatoryValue):
        return missing_key(key, "a value in the YAML file or as key=value on the command line")
    if isinstance(err, InterpolationResolutionError):
        return ConfigError(key, _NO_VALUE, "interpolations of existing keys", message)
    value = getattr(err, "value", _NO_VALUE)
    expected = _field_type_at(schema, rel)
    return ConfigError(key, value, expected or "a value of the declared type", message)


def _walk(schema: type, dotted: str) -> tuple[type | None, str]:
    """Follow `dotted` through nested dataclass fields; return (owner class, last part)."""
    parts = [p for p in dotted.split(".") if p]
    owner: type | None = schema
    for part in parts[:-1]:
        kind = _field_types(owner).get(part)
        owner = kind if dataclasses.is_dataclass(kind) else None
    return owner, parts[-1] if parts else ""


def _field_types(owner: type | None) -> dict[str, Any]:
    """Field name -> resolved annotation (postponed `from __future__` strings resolved)."""
    if owner is None or not dataclasses.is_dataclass(owner):
        return {}
    hints = typing.get_type_hints(owner)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(owner)}


def _fields_at(schema: type, dotted: str) -> list[str]:
    return list(_field_types(_walk(schema, dotted)[0]))


def _field_type_at(schema: type, dotted: str) -> str:
    owner, last = _walk(schema, dotted)
    kind = _field_types(owner).get(last)
    if kind is None:
        return ""
    return f"a value of type {getattr(kind, '__name__', None) or str(kind).replace('typing.', '')}"
