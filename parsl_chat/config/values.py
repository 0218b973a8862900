"""Checking raw values (YAML, environment, options) against their declared types and keys."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .schema import Secret

__all__ = ["check_keys", "coerce"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check and convert one value against its declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(value, args[0], where, key)
    convert = _CONVERTERS.get(hint) or (_to_dict if origin is dict or hint is dict else None)
    return value if convert is None else convert(value, where, key)


def _to_secret(value: Any, where: str, key: str) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be a string")
    return Secret(value)


def _to_bool(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")


def _to_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")


def _to_float(value: Any, where: str, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")


def _to_str(value: Any, where: str, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")


def _to_dict(value: Any, where: str, key: str) -> dict[Any, Any]:
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")


_CONVERTERS: dict[Any, typing.Callable[[Any, str, str], Any]] = {
    Secret: _to_secret,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def check_keys(data: Mapping[str, Any], valid: list[str], where: str, lines: dict[str, int] | None, section: str) -> None:
    """Refuse a key the section does not have, naming the valid ones."""
    for key in data:
        if key not in valid:
            at = f"{where}:{lines[key]}" if lines and key in lines else where
            what = f"in '{section}'" if section else "at top level"
            raise ConfigError(f"{at}: unknown key {key!r} {what}; valid keys: {', '.join(valid)}")
