"""Finding profiles: the shipped ``configs/`` and the user's ``$XDG_CONFIG_HOME/parsl-chat/profiles``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ConfigError
from .yamlfile import read_yaml

__all__ = ["find_profile", "list_profiles", "shipped_configs_dir", "user_configs_dir"]


def shipped_configs_dir() -> Path:
    """The ``configs/`` directory shipped with parsl-chat (source tree or installed data)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "configs", Path(sys.prefix) / "share" / "parsl-chat" / "configs"):
        if (candidate / "local.yaml").is_file():
            return candidate
    return package.parent / "configs"


def user_configs_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "parsl-chat" / "profiles"


def list_profiles() -> list[tuple[str, Path, str]]:
    """(name, path, kind) of every profile: user ones first, they shadow shipped ones."""
    seen: dict[str, tuple[str, Path, str]] = {}
    for kind, folder in (("user", user_configs_dir()), ("shipped", shipped_configs_dir())):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            try:
                data = read_yaml(path)
            except ConfigError:
                continue
            if "executor" in data and path.stem not in seen:
                seen[path.stem] = (path.stem, path, kind)
    return sorted(seen.values())


def find_profile(name_or_path: str) -> Path:
    """Resolve ``--profile``: a path to a YAML file, or the name of a user or shipped profile."""
    as_path = Path(name_or_path)
    if as_path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not as_path.is_file():
            raise ConfigError(f"profile file {as_path} does not exist")
        return as_path
    for name, path, _kind in list_profiles():
        if name == name_or_path:
            return path
    names = ", ".join(n for n, _, _ in list_profiles()) or "none found"
    raise ConfigError(
        f"unknown profile {name_or_path!r}; available profiles: {names}", hint="run 'parsl-chat profiles' to list them"
    )
