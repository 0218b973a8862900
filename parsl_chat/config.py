"""Typed configuration: profiles (where work runs) and run configs (what runs).

Values are layered CLI > environment > YAML (profile, then ``--config``) >
defaults, and every value remembers which layer set it, so ``config show``
can say so. YAML is read with line numbers so that a bad key or value is
reported as ``file:line``, together with the valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError

__all__ = [
    "EXECUTORS",
    "AgentConfig",
    "CostConfig",
    "LimitsConfig",
    "ProfileConfig",
    "RunConfig",
    "Secret",
    "ServerConfig",
    "Settings",
    "find_profile",
    "list_profiles",
    "load_settings",
    "shipped_configs_dir",
]

EXECUTORS = ("local", "slurm", "slurm-allocation", "kubernetes")
ROUTINGS = ("round_robin", "least_loaded")
SERVER_KINDS = ("embedded", "none", "command")
REDACTED = "***redacted***"


class Secret:
    """A credential. Its repr and str never show the value; only ``reveal()`` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:  # so it can travel to Parsl workers
        return (Secret, (self._value,))


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ProfileConfig:
    """Where work runs: the Parsl executor and its provider's settings."""

    SECTION: ClassVar[str] = "profile"
    #: keys that only make sense for some executors (checked after loading)
    ONLY_FOR: ClassVar[dict[str, tuple[str, ...]]] = {
        "warm_start": ("local",),
        "partition": ("slurm",),
        "account": ("slurm",),
        "qos": ("slurm",),
        "exclusive": ("slurm",),
        "mem_per_node_gb": ("slurm",),
        "scheduler_options": ("slurm",),
        "namespace": ("kubernetes",),
        "image": ("kubernetes",),
        "service_account": ("kubernetes",),
        "image_pull_policy": ("kubernetes",),
        "node_selector": ("kubernetes",),
        "pod_cpu": ("kubernetes",),
        "pod_memory": ("kubernetes",),
        "kubeconfig": ("kubernetes",),
        "context": ("kubernetes",),
    }

    name: str = "local"
    description: str = ""
    executor: str = "local"
    workers: int = 2  # worker processes per node; each runs many requests concurrently
    nodes_per_block: int = 1
    init_blocks: int = 1
    min_blocks: int = 0
    max_blocks: int = 1
    walltime: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    cores_per_node: int | None = None
    mem_per_node_gb: float | None = None
    scheduler_options: str = ""
    worker_init: str = ""
    strategy: str = "simple"  # Parsl scaling strategy: none, simple, htex_auto_scale
    warm_start: bool = True  # local: answer the first chunks in-process while Parsl's workers start
    strategy_period_s: float = 1.0
    max_idletime_s: float = 60.0
    status_polling_s: int = 2  # Parsl's default of 60 s delays the first result on SLURM
    address: str | None = None  # interchange address workers connect to (auto when unset)
    namespace: str = "default"
    image: str = "python:3.11-slim"
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    node_selector: dict[str, str] = field(default_factory=dict)
    pod_cpu: str = "1"
    pod_memory: str = "1Gi"
    kubeconfig: str | None = None
    context: str | None = None


@dataclass(frozen=True)
class AgentConfig:
    """One chat agent: a system prompt on an OpenAI-compatible endpoint."""

    SECTION: ClassVar[str] = "agents[]"

    name: str
    system_prompt: str = "You are a helpful assistant. Answer concisely."
    model: str | None = None  # None: the run's default model
    endpoint: str | None = None  # None: the run's default endpoint
    api_key: Secret | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    concurrency: int | None = None  # None: limits.concurrency

    def __repr__(self) -> str:
        return (
            f"AgentConfig(name={self.name!r}, model={self.model!r}, endpoint={self.endpoint!r}, "
            f"weight={self.weight}, concurrency={self.concurrency})"
        )


@dataclass(frozen=True)
class LimitsConfig:
    """How hard to push each agent, and how to treat failures."""

    SECTION: ClassVar[str] = "limits"

    concurrency: int = 4  # requests in flight per agent
    requests_per_minute: int = 0  # 0: no limit
    tokens_per_minute: int = 0
    max_attempts: int = 4
    timeout_s: float = 120.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    chunk_size: int = 0  # prompts per Parsl task; 0: chosen from the concurrency
    max_line_mb: float = 64.0  # a prompts-file line (one prompt) may be this big; longer lines are refused

    @property
    def max_line_bytes(self) -> int:
        return int(self.max_line_mb * (1 << 20))


@dataclass(frozen=True)
class ServerConfig:
    """The model server parsl-chat starts when no endpoint is configured."""

    SECTION: ClassVar[str] = "server"

    kind: str = "embedded"  # embedded | none | command
    command: str | None = None  # template with {model} {host} {port}
    model: str = "smollm2-135m-instruct"  # name the server answers to
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    ready_path: str = "/v1/models"
    ready_timeout_s: float = 180.0
    context_tokens: int = 2048
    max_restarts: int = 3  # a server that dies mid-run is restarted this often per node, then the run stops (exit 3)


@dataclass(frozen=True)
class CostConfig:
    """Optional prices, turned into cost per run and per 1M tokens in reports."""

    SECTION: ClassVar[str] = "cost"

    su_per_node_hour: float | None = None
    usd_per_1m_prompt_tokens: float | None = None
    usd_per_1m_completion_tokens: float | None = None


@dataclass(frozen=True)
class RunConfig:
    """What runs: the agents, how prompts are routed to them, limits, server."""

    SECTION: ClassVar[str] = ""

    endpoint: str | None = None
    model: str | None = None
    api_key: Secret | None = None
    agents: tuple[AgentConfig, ...] = ()
    agent_count: int = 3
    routing: str = "round_robin"
    max_failures: str = "0"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cost: CostConfig = field(default_factory=CostConfig)


#: YAML spells agent_count as ``agent_count``; the CLI as --agents.
_NESTED = {"limits": LimitsConfig, "server": ServerConfig, "cost": CostConfig}


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(sys.modules[__name__]))


# --------------------------------------------------------------------------- YAML with lines


class _LineDict(dict[str, Any]):
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


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)  # type: ignore[arg-type]


def read_yaml(path: Path) -> _LineDict:
    """Read a YAML mapping, with errors naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start + 1})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        empty = _LineDict()
        empty.lines = {}
        return empty
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of keys to values, got {type(data).__name__}")
    assert isinstance(data, _LineDict)  # every mapping is built by _construct_mapping
    return data


# --------------------------------------------------------------------------- values and sources


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``cli``, ``env``, ``yaml`` or ``default``, with detail."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind

    def where(self) -> str:
        """How an error message names this place: ``file:line``, the variable or the option."""
        if self.kind == "yaml":
            return self.detail
        if self.kind == "env":
            return f"environment variable {self.detail}"
        if self.kind == "cli":
            name = _OPTION_NAMES.get(self.detail, self.detail.rsplit(".", 1)[-1].replace("_", "-"))
            return f"option --{name}"
        return "default"


#: Settings whose command-line option is not named after the key (``agent_count`` -> ``--agents``).
_OPTION_NAMES = {"agent_count": "agents"}


DEFAULT = Source("default")


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check and convert one value against its declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, key)
    if hint is Secret:
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string")
        return Secret(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], valid: list[str], where: str, lines: dict[str, int] | None, section: str) -> None:
    for key in data:
        if key not in valid:
            at = f"{where}:{lines[key]}" if lines and key in lines else where
            what = f"in '{section}'" if section else "at top level"
            raise ConfigError(f"{at}: unknown key {key!r} {what}; valid keys: {', '.join(valid)}")


def _line(data: Any, key: str) -> int | None:
    lines = getattr(data, "lines", None)
    return lines.get(key) if lines else None


class Settings:
    """The resolved profile and run config, with the source of every value."""

    def __init__(self, profile: ProfileConfig, run: RunConfig, sources: dict[str, Source], files: list[Path]) -> None:
        self.profile = profile
        self.run = run
        self.sources = sources
        self.files = files

    def __repr__(self) -> str:
        return f"Settings(profile={self.profile.name!r}, executor={self.profile.executor!r}, agents={len(self.run.agents)})"

    def source_of(self, key: str) -> Source:
        return self.sources.get(key, DEFAULT)

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain data for config.yaml; secrets replaced by a marker."""

        def plain(value: Any) -> Any:
            if isinstance(value, Secret):
                return REDACTED if redact else value.reveal()
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {"profile": plain(self.profile), **plain(self.run)}

    def rows(self) -> list[tuple[str, Any, Source]]:
        """(dotted key, redacted value, source) for every setting, for ``config show``."""
        out: list[tuple[str, Any, Source]] = []
        data = self.as_dict()
        for key, value in data["profile"].items():
            out.append((f"profile.{key}", value, self.source_of(f"profile.{key}")))
        for key, value in data.items():
            if key == "profile":
                continue
            if key in _NESTED:
                for sub, subval in value.items():
                    out.append((f"{key}.{sub}", subval, self.source_of(f"{key}.{sub}")))
            elif key == "agents":
                for agent in value:
                    for sub, subval in agent.items():
                        name = f"agents.{agent['name']}.{sub}"
                        out.append((name, subval, self.source_of(name)))
            else:
                out.append((key, value, self.source_of(key)))
        return out


# --------------------------------------------------------------------------- discovery


def shipped_configs_dir() -> Path:
    """The ``configs/`` directory shipped with parsl-chat (source tree or installed data)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", Path(sys.prefix) / "share" / "parsl-chat" / "configs"):
        if (candidate / "local.yaml").is_file():
            return candidate
    return here.parent / "configs"


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


# --------------------------------------------------------------------------- loading


ENV_PREFIX = "PARSL_CHAT_"


def _env_names() -> dict[str, str]:
    """PARSL_CHAT_* variable name -> dotted setting key."""
    names: dict[str, str] = {}
    for key in _fields(ProfileConfig):
        if key not in ("name", "description"):
            names[ENV_PREFIX + key.upper()] = f"profile.{key}"
    for key in _fields(RunConfig):
        if key in _NESTED:
            for sub in _fields(_NESTED[key]):
                names[f"{ENV_PREFIX}{key.upper()}_{sub.upper()}"] = f"{key}.{sub}"
        elif key == "agents":
            continue
        elif key == "agent_count":
            names[ENV_PREFIX + "AGENTS"] = key
        else:
            names[ENV_PREFIX + key.upper()] = key
    return names


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
    env = os.environ if env is None else env
    sources: dict[str, Source] = {}
    values: dict[str, Any] = {}  # dotted key -> raw value
    files: list[Path] = []

    profile_path = find_profile(profile)
    files.append(profile_path)
    profile_data = read_yaml(profile_path)
    _take_section(profile_data, ProfileConfig, "profile", str(profile_path), values, sources)
    if "name" not in profile_data:
        values["profile.name"] = profile_path.stem

    config_path = Path(config_file) if config_file else shipped_configs_dir() / "agents.yaml"
    files.append(config_path)
    config_data = read_yaml(config_path)
    agents_raw: list[Any] | None = None
    agents_source: Source | None = None
    top_valid = [k for k in _fields(RunConfig)] + ["profile"]
    _check_keys(config_data, top_valid, str(config_path), config_data.lines, "")
    for key, raw in config_data.items():
        where = f"{config_path}:{config_data.lines.get(key, 1)}"
        if key == "profile":
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: 'profile' must be a mapping of profile keys")
            _take_section(raw, ProfileConfig, "profile", str(config_path), values, sources)
        elif key in _NESTED:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: '{key}' must be a mapping; valid keys: {', '.join(_fields(_NESTED[key]))}")
            _take_section(raw, _NESTED[key], key, str(config_path), values, sources)
        elif key == "agents":
            if not isinstance(raw, list) or not raw:
                raise ConfigError(f"{where}: 'agents' must be a non-empty list of agents")
            agents_raw, agents_source = raw, Source("yaml", where)
        else:
            values[key] = raw
            sources[key] = Source("yaml", where)

    # environment: OpenAI's own variables first, PARSL_CHAT_* win over them
    for var, key in (("OPENAI_BASE_URL", "endpoint"), ("OPENAI_API_KEY", "api_key")):
        if env.get(var):
            values[key] = env[var]
            sources[key] = Source("env", var)
    env_names = _env_names()
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_SETTINGS:
            continue
        if var not in env_names:
            raise ConfigError(
                f"environment variable {var} is not a parsl-chat setting; valid names: {', '.join(sorted(env_names))}"
            )
        values[env_names[var]] = raw
        sources[env_names[var]] = Source("env", var)

    for key, raw in (cli or {}).items():
        if raw is None:
            continue
        values[key] = raw
        sources[key] = Source("cli", key)

    profile_cfg = _build(ProfileConfig, "profile", values, sources)
    _check_applicable(profile_cfg, sources)
    nested = {name: _build(cls, name, values, sources) for name, cls in _NESTED.items()}
    run_kwargs: dict[str, Any] = {}
    hints = _hints(RunConfig)
    for key in _fields(RunConfig):
        if key in _NESTED or key == "agents":
            continue
        if key in values:
            run_kwargs[key] = _coerce(values[key], hints[key], sources.get(key, DEFAULT).where(), key)
    agents = _build_agents(agents_raw, agents_source, str(config_path), sources)
    run = RunConfig(agents=agents, **nested, **run_kwargs)
    _validate_run(run, sources)
    return Settings(profile_cfg, run, sources, files)


def _take_section(
    data: Mapping[str, Any], cls: type, prefix: str, where: str, values: dict[str, Any], sources: dict[str, Source]
) -> None:
    valid = [k for k in _fields(cls)]
    _check_keys(data, valid, where, getattr(data, "lines", None), prefix)
    for key, raw in data.items():
        line = _line(data, key)
        values[f"{prefix}.{key}"] = raw
        sources[f"{prefix}.{key}"] = Source("yaml", f"{where}:{line}" if line else where)


def _build(cls: type, prefix: str, values: dict[str, Any], sources: dict[str, Source]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for key in _fields(cls):
        dotted = f"{prefix}.{key}"
        if dotted in values:
            kwargs[key] = _coerce(values[dotted], hints[key], sources.get(dotted, DEFAULT).where(), dotted)
    return cls(**kwargs)


def _build_agents(
    raw: list[Any] | None, source: Source | None, where: str, sources: dict[str, Source]
) -> tuple[AgentConfig, ...]:
    if raw is None:
        return ()
    hints = _hints(AgentConfig)
    valid = list(_fields(AgentConfig))
    agents = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: agent {i + 1} must be a mapping with at least 'name'")
        lines = getattr(item, "lines", {})
        at = f"{where}:{min(lines.values())}" if lines else str(source)
        _check_keys(item, valid, where, lines, "agents")
        if "name" not in item:
            raise ConfigError(f"{at}: agent {i + 1} has no 'name'")
        kwargs = {}
        for key, value in item.items():
            line = lines.get(key)
            kwargs[key] = _coerce(value, hints[key], f"{where}:{line}" if line else at, f"agents.{key}")
        agent = AgentConfig(**kwargs)
        if agent.name in names:
            raise ConfigError(f"{at}: duplicate agent name {agent.name!r}")
        names.add(agent.name)
        for key in item:
            line = lines.get(key)
            sources[f"agents.{agent.name}.{key}"] = Source("yaml", f"{where}:{line}" if line else where)
        agents.append(agent)
    return tuple(agents)


def _check_applicable(profile: ProfileConfig, sources: dict[str, Source]) -> None:
    if profile.executor not in EXECUTORS:
        where = sources.get("profile.executor", DEFAULT).where()
        raise ConfigError(f"{where}: unknown executor {profile.executor!r}; valid executors: {', '.join(EXECUTORS)}")
    for key, executors in ProfileConfig.ONLY_FOR.items():
        src = sources.get(f"profile.{key}")
        if src is not None and src.kind == "yaml" and profile.executor not in executors:
            raise ConfigError(
                f"{src.detail}: '{key}' applies only to executor {' or '.join(executors)}, "
                f"but this profile's executor is {profile.executor!r}"
            )
    for key in ("workers", "nodes_per_block", "max_blocks"):
        if getattr(profile, key) < 1:
            raise ConfigError(f"{sources.get('profile.' + key, DEFAULT).where()}: '{key}' must be at least 1")
    if profile.min_blocks > profile.max_blocks or profile.init_blocks > profile.max_blocks:
        raise ConfigError(
            f"{sources.get('profile.max_blocks', DEFAULT).where()}: init_blocks and min_blocks must not exceed max_blocks"
        )


def _validate_run(run: RunConfig, sources: dict[str, Source]) -> None:
    if run.routing not in ROUTINGS:
        raise ConfigError(
            f"{sources.get('routing', DEFAULT).where()}: unknown routing {run.routing!r}; valid: {', '.join(ROUTINGS)}"
        )
    if run.server.kind not in SERVER_KINDS:
        raise ConfigError(
            f"{sources.get('server.kind', DEFAULT).where()}: unknown server kind {run.server.kind!r}; "
            f"valid: {', '.join(SERVER_KINDS)}"
        )
    if run.server.kind == "command" and not run.server.command:
        raise ConfigError(f"{sources.get('server.kind', DEFAULT).where()}: server kind 'command' needs 'server.command'")
    if run.agent_count < 1:
        raise ConfigError(f"{sources.get('agent_count', DEFAULT).where()}: the number of agents must be at least 1")
    if run.limits.concurrency < 1:
        raise ConfigError(f"{sources.get('limits.concurrency', DEFAULT).where()}: 'limits.concurrency' must be at least 1")
    if run.limits.max_attempts < 1:
        raise ConfigError(f"{sources.get('limits.max_attempts', DEFAULT).where()}: 'limits.max_attempts' must be at least 1")
    if not run.limits.max_line_mb > 0:
        raise ConfigError(f"{sources.get('limits.max_line_mb', DEFAULT).where()}: 'limits.max_line_mb' must be positive")
    if run.server.max_restarts < 0:
        raise ConfigError(f"{sources.get('server.max_restarts', DEFAULT).where()}: 'server.max_restarts' must be 0 or more")
    _check_endpoint(run.endpoint, sources.get("endpoint", DEFAULT).where())
    for agent in run.agents:
        _check_endpoint(agent.endpoint, sources.get(f"agents.{agent.name}.endpoint", DEFAULT).where())
        if agent.concurrency is not None and agent.concurrency < 1:
            raise ConfigError(
                f"{sources.get(f'agents.{agent.name}.concurrency', DEFAULT).where()}: agent concurrency must be at least 1"
            )
        if agent.weight <= 0:
            raise ConfigError(f"{sources.get(f'agents.{agent.name}.weight', DEFAULT).where()}: agent weight must be positive")
    parse_max_failures(run.max_failures, sources.get("max_failures", DEFAULT).where())


def _check_endpoint(url: str | None, where: str) -> None:
    """An endpoint is an http(s) base URL: anything else would fail every request, one by one."""
    if url is None:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = "***@" + url.rsplit("@", 1)[1] if "@" in url else url  # user:password@ stays out of messages
        raise ConfigError(f"{where}: endpoint must be an http(s) base URL like http://host:8000/v1, got {shown!r}")


def parse_max_failures(spec: str, where: str = "--max-failures") -> tuple[int | None, float | None]:
    """``N`` (a count) or ``P%`` (a share of prompts)."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return None, share / 100
        count = int(text)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise ConfigError(f"{where}: max_failures must be a count like 10 or a share like 1%, got {spec!r}") from None
