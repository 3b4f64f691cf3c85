"""The serving sinks' settings (``serve.sinks``): each entry checked and completed with its defaults, so that a
misspelt key or a missing table is refused at start-up naming the entry, not after a night's refresh."""

from __future__ import annotations

import re
from typing import Any

from retrieval_core.config.schema import SINK_KINDS, ConfigError

REQUIRED = {"lance": ("uri", "table"), "qdrant": ("url", "collection")}
OPTIONAL: dict[str, dict[str, Any]] = {
    "lance": {"storage_options": {}, "index_growth": 0.0, "index_min_rows": 100_000},
    "qdrant": {"api_key_env": "", "distance": "auto", "parallel": 1},
}
COMMON = {"name": "", "batch_size": 0}
QDRANT_DISTANCES = ("auto", "dot", "cosine", "euclid")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def sink_specs(sinks: list, batch_size: int) -> list[dict]:
    """Every entry of ``serve.sinks`` with its defaults filled in (``name``: ``<kind>-<table or collection>``;
    ``batch_size``: ``serve.batch_size``); a bad entry, or two sharing a name, is a :class:`ConfigError`."""
    specs = [_spec(i, entry, batch_size) for i, entry in enumerate(sinks)]
    names = [s["name"] for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"'serve.sinks': two sinks are named {twice[0]!r}; give each a distinct `name`")
    return specs


def _spec(i: int, entry: Any, batch_size: int) -> dict:
    where = f"'serve.sinks[{i}]'"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} = {entry!r}: expected a mapping with `kind` ({' or '.join(SINK_KINDS)})")
    kind = entry.get("kind")
    if kind not in SINK_KINDS:
        raise ConfigError(f"{where}: kind = {kind!r}: expected one of {', '.join(SINK_KINDS)}")
    allowed = {"kind", *REQUIRED[kind], *OPTIONAL[kind], *COMMON}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for a {kind} sink; allowed: {', '.join(sorted(allowed))}"
        )
    for key in REQUIRED[kind]:
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}: a {kind} sink needs `{key}` (a non-empty string)")
    spec = {**COMMON, **OPTIONAL[kind], **entry}
    spec["name"] = spec["name"] or f"{kind}-{entry[REQUIRED[kind][1]]}"
    spec["batch_size"] = spec["batch_size"] or batch_size
    _check_values(where, spec)
    return spec


def _check_values(where: str, spec: dict) -> None:
    if not isinstance(spec["name"], str) or not _NAME.match(spec["name"]):
        raise ConfigError(
            f"{where}: name = {spec['name']!r}: expected letters, digits, '.', '_' or '-' (it names sinks/<name>.json)"
        )
    if not isinstance(spec["batch_size"], int) or spec["batch_size"] < 1:
        raise ConfigError(f"{where}: batch_size = {spec['batch_size']!r}: expected a positive integer")
    if spec["kind"] == "lance":
        growth, least = spec["index_growth"], spec["index_min_rows"]
        if not isinstance(growth, (int, float)) or growth < 0:
            raise ConfigError(f"{where}: index_growth = {growth!r}: expected a number >= 0 (0 = no ANN index)")
        if not isinstance(least, int) or least < 256:
            raise ConfigError(f"{where}: index_min_rows = {least!r}: expected an integer >= 256")
        if not isinstance(spec["storage_options"], dict):
            raise ConfigError(f"{where}: storage_options: expected a mapping")
    else:
        if spec["distance"] not in QDRANT_DISTANCES:
            raise ConfigError(
                f"{where}: distance = {spec['distance']!r}: expected one of {', '.join(QDRANT_DISTANCES)}"
            )
        if not isinstance(spec["parallel"], int) or spec["parallel"] < 1:
            raise ConfigError(f"{where}: parallel = {spec['parallel']!r}: expected a positive integer")
        if not isinstance(spec["api_key_env"], str):
            raise ConfigError(f"{where}: api_key_env = {spec['api_key_env']!r}: expected the name of a variable")
