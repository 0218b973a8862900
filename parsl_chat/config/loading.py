"""Resolving every setting from its layers: CLI > environment > YAML (profile, then ``--config``) > defaults.

Each value keeps the :class:`Source` that set it, for ``config show`` and for
error messages (``file:line``, the variable, the option).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .discovery import find_profile, shipped_configs_dir
from .profiles import ProfileConfig
from .schema import NESTED, AgentConfig, RunConfig, field_names, type_hints
from .settings import DEFAULT, Settings, Source
from .validation import check_profile, validate_run
from .values import check_keys, coerce
from .yamlfile import line_of, read_yaml

__all__ = ["ENV_PREFIX", "load_settings"]

ENV_PREFIX = "PARSL_CHAT_"

#: environment variables the CLI itself reads, not settings
_ENV_NOT_SETTINGS = {
    "PARSL_CHAT_PROFILE",
    "PARSL_CHAT_CONFIG",
    "PARSL_CHAT_DEBUG",
    "PARSL_CHAT_WALLTIME_MARGIN_S",  # read by the walltime watch
    # read by jobs/chat_batch.sh
    "PARSL_CHAT_PROMPTS",
    "PARSL_CHAT_OUT",
    "PARSL_CHAT_ARGS",
    "PARSL_CHAT_MAX_RESUBMIT",
    "PARSL_CHAT_RESUBMITTED",
    "PARSL_CHAT_JOB_SCRIPT",
}


@dataclass
class _Layers:
    """Raw values by dotted key (``profile.workers``, ``limits.timeout_s``), each with its source; later layers win."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    agents: list[Any] | None = None  # the config file's agents, still raw
    agents_source: Source | None = None

    def set(self, key: str, raw: Any, source: Source) -> None:
        self.values[key] = raw
        self.sources[key] = source


def load_settings(
    profile: str = "local",
    config_file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting from the four layers.

    ``cli`` maps dotted keys (``profile.workers``, ``endpoint``, ``agent_count``)
    to values given on the command line; ``None`` values are ignored.
    """
    layers = _Layers()
    profile_path = find_profile(profile)
    _take_profile_file(profile_path, layers)
    config_path = Path(config_file) if config_file else shipped_configs_dir() / "agents.yaml"
    _take_config_file(config_path, layers)
    _take_env(os.environ if env is None else env, layers)
    for key, raw in (cli or {}).items():
        if raw is not None:
            layers.set(key, raw, Source("cli", key))

    profile_cfg = _build(ProfileConfig, "profile", layers)
    check_profile(profile_cfg, layers.sources)
    run = _build_run(layers, config_path)
    validate_run(run, layers.sources)
    return Settings(profile_cfg, run, layers.sources, [profile_path, config_path])


def _take_profile_file(path: Path, layers: _Layers) -> None:
    data = read_yaml(path)
    _take_section(data, ProfileConfig, "profile", str(path), layers)
    if "name" not in data:
        layers.values["profile.name"] = path.stem  # a default, not a YAML value: its source stays 'default'


def _take_config_file(path: Path, layers: _Layers) -> None:
    data = read_yaml(path)
    check_keys(data, [*field_names(RunConfig), "profile"], str(path), data.lines, "")
    for key, raw in data.items():
        where = f"{path}:{data.lines.get(key, 1)}"
        if key == "profile":
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: 'profile' must be a mapping of profile keys")
            _take_section(raw, ProfileConfig, "profile", str(path), layers)
        elif key in NESTED:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping; valid keys: {', '.join(field_names(NESTED[key]))}")
            _take_section(raw, NESTED[key], key, str(path), layers)
        elif key == "agents":
            if not isinstance(raw, list) or not raw:
                raise ConfigError(f"{where}: 'agents' must be a non-empty list of agents")
            layers.agents, layers.agents_source = raw, Source("yaml", where)
        else:
            layers.set(key, raw, Source("yaml", where))


def _take_section(data: Mapping[str, Any], cls: type, prefix: str, where: str, layers: _Layers) -> None:
    check_keys(data, field_names(cls), where, getattr(data, "lines", None), prefix)
    for key, raw in data.items():
        line = line_of(data, key)
        layers.set(f"{prefix}.{key}", raw, Source("yaml", f"{where}:{line}" if line else where))


def _env_names() -> dict[str, str]:
    """PARSL_CHAT_* variable name -> dotted setting key."""
    names: dict[str, str] = {}
    for key in field_names(ProfileConfig):
        if key not in ("name", "description"):
            names[ENV_PREFIX + key.upper()] = f"profile.{key}"
    for key in field_names(RunConfig):
        if key in NESTED:
            for sub in field_names(NESTED[key]):
                names[f"{ENV_PREFIX}{key.upper()}_{sub.upper()}"] = f"{key}.{sub}"
        elif key == "agent_count":
            names[ENV_PREFIX + "AGENTS"] = key
        elif key != "agents":
            names[ENV_PREFIX + key.upper()] = key
    return names


def _take_env(env: Mapping[str, str], layers: _Layers) -> None:
    """OpenAI's own variables first; PARSL_CHAT_* win over them."""
    for var, key in (("OPENAI_BASE_URL", "endpoint"), ("OPENAI_API_KEY", "api_key")):
        if env.get(var):
            layers.set(key, env[var], Source("env", var))
    env_names = _env_names()
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_SETTINGS:
            continue
        if var not in env_names:
            raise ConfigError(
                f"environment variable {var} is not a parsl-chat setting; valid names: {', '.join(sorted(env_names))}"
            )
        layers.set(env_names[var], raw, Source("env", var))


def _build(cls: type, prefix: str, layers: _Layers) -> Any:
    """One section's dataclass from the values given for it (the rest keep their defaults)."""
    hints = type_hints(cls)
    kwargs = {}
    for key in field_names(cls):
        dotted = f"{prefix}.{key}"
        if dotted in layers.values:
            kwargs[key] = coerce(layers.values[dotted], hints[key], layers.sources.get(dotted, DEFAULT).where(), dotted)
    return cls(**kwargs)


def _build_run(layers: _Layers, config_path: Path) -> RunConfig:
    nested = {name: _build(cls, name, layers) for name, cls in NESTED.items()}
    hints = type_hints(RunConfig)
    top_level = {}
    for key in field_names(RunConfig):
        if key not in NESTED and key != "agents" and key in layers.values:
            top_level[key] = coerce(layers.values[key], hints[key], layers.sources.get(key, DEFAULT).where(), key)
    agents = _build_agents(layers, str(config_path))
    return _with_schema_paths(RunConfig(agents=agents, **nested, **top_level), layers.sources, config_path.parent)


def _build_agents(layers: _Layers, where: str) -> tuple[AgentConfig, ...]:
    if layers.agents is None:
        return ()
    hints = type_hints(AgentConfig)
    valid = field_names(AgentConfig)
    agents: list[AgentConfig] = []
    for i, item in enumerate(layers.agents):
        if not isinstance(item, dict):
            raise ConfigError(f"{layers.agents_source}: agent {i + 1} must be a mapping with at least 'name'")
        lines = getattr(item, "lines", {})
        at = f"{where}:{min(lines.values())}" if lines else str(layers.agents_source)
        check_keys(item, valid, where, lines, "agents")
        if "name" not in item:
            raise ConfigError(f"{at}: agent {i + 1} has no 'name'")
        kwargs = {}
        for key, value in item.items():
            line = lines.get(key)
            kwargs[key] = coerce(value, hints[key], f"{where}:{line}" if line else at, f"agents.{key}")
        agent = AgentConfig(**kwargs)
        if any(agent.name == other.name for other in agents):
            raise ConfigError(f"{at}: duplicate agent name {agent.name!r}")
        for key in item:
            line = lines.get(key)
            layers.sources[f"agents.{agent.name}.{key}"] = Source("yaml", f"{where}:{line}" if line else where)
        agents.append(agent)
    return tuple(agents)


def _with_schema_paths(run: RunConfig, sources: dict[str, Source], config_dir: Path) -> RunConfig:
    """Schema files named in YAML are relative to that file; from an option or variable, to the working directory."""

    def absolute(path: str | None, key: str) -> str | None:
        if path is None:
            return None
        base = config_dir if sources.get(key, DEFAULT).kind == "yaml" else Path.cwd()
        return str((base / Path(path).expanduser()).resolve())

    agents = tuple(dataclasses.replace(a, schema=absolute(a.schema, f"agents.{a.name}.schema")) for a in run.agents)
    return dataclasses.replace(run, schema=absolute(run.schema, "schema"), agents=agents)
