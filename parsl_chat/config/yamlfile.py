"""YAML read with the line of every key, so that a bad key or value is reported as ``file:line``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["LineDict", "line_of", "read_yaml"]


class LineDict(dict[str, Any]):
    """A mapping read from YAML that remembers the line of each key."""

    lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


# YAML 1.1 reads ``walltime: 12:00:00`` as the base-60 number 43200 (and ``1:30`` as 90);
# such values stay strings here, as in YAML 1.2.
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_LineLoader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:str", _SEXAGESIMAL)] if first and first in "+-0123456789" else []) + list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _empty() -> LineDict:
    empty = LineDict()
    empty.lines = {}
    return empty


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = _empty()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start + 1})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def read_yaml(path: Path) -> LineDict:
    """Read a YAML mapping, with errors naming file and line."""
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return _empty()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of keys to values, got {type(data).__name__}")
    assert isinstance(data, LineDict)  # every mapping is built by _construct_mapping
    return data


def line_of(data: Any, key: str) -> int | None:
    """The line of ``key`` in a mapping read here (None for other mappings)."""
    lines = getattr(data, "lines", None)
    return lines.get(key) if lines else None
