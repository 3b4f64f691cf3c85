"""Loading a job configuration: YAML (any fsspec URL) with ``${VAR}`` expansion, dotted ``--set`` overrides, type
coercion per field, then the rules (:func:`retrieval_core.config.rules.validate`)."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from typing import Any, Union

import yaml

from retrieval_core.config.rules import validate
from retrieval_core.config.schema import REDACTED, Config, ConfigError, unknown_key_error, valid_keys


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}' = {value!r}: expected {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' = {value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' = {value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' = {value!r}: expected a string")
    if hint in (list, dict):
        if isinstance(value, hint):
            return value
        shown = REDACTED if key.endswith("storage_options") else repr(value)  # it may hold credentials
        raise ConfigError(f"'{key}' = {shown}: expected a {hint.__name__}")
    raise ConfigError(f"'{key}': unsupported type {hint}")  # pragma: no cover - a programming error


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    return names + (" or null" if type(None) in typing.get_args(hint) else "")


def _build(cls: Any, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key_error(f"{prefix}{key}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``'model.batch_size=64'`` -> ``('model.batch_size', 64)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set a dotted key inside a nested dict, refusing unknown keys."""
    if key not in valid_keys():
        raise unknown_key_error(key)
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{part}' in '{key}' is not a section")
    node[leaf] = value


def read_yaml(path: str) -> dict:
    """A config file as a dict, with environment variables expanded in its strings (see :func:`expand_env`)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {exc}") from None
    return expand_env(data or {}, path)


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def expand_env(value: Any, source: str) -> Any:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` in every string of a loaded config, as a
    shell would: an unset or empty VAR is an error naming it (with the message, for ``:?``), or the default."""
    if isinstance(value, dict):
        return {key: expand_env(item, source) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, source) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, word = match.groups()
        found = os.environ.get(name, "")
        if found:
            return found
        if operator == ":-":
            return word
        hint = f": {word.strip()}" if operator == ":?" and word.strip() else ""
        raise ConfigError(f"config file '{source}' uses ${{{name}}}, which is not set{hint}")

    return ENV_REFERENCE.sub(substitute, value)


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    config = _build(Config, data)
    validate(config)
    return config
