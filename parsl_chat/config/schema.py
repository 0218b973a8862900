"""What runs: the typed run config (agents, limits, server, cost, output, cache) and :class:`Secret`.

Each dataclass is one YAML section; its fields are the section's valid keys,
their types are checked on loading (:mod:`parsl_chat.config.values`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "CACHE_MODES",
    "NESTED",
    "REDACTED",
    "ROUTINGS",
    "SERVER_ENGINES",
    "SERVER_KINDS",
    "AgentConfig",
    "CacheConfig",
    "CostConfig",
    "LimitsConfig",
    "OutputConfig",
    "RunConfig",
    "Secret",
    "ServerConfig",
    "field_names",
    "short_repr",
    "type_hints",
]

ROUTINGS = ("round_robin", "least_loaded")
SERVER_KINDS = ("embedded", "none", "command")
CACHE_MODES = ("read_write", "read", "off")
SERVER_ENGINES = ("auto", "llama-server", "llama-cpp-python")  # which program serves the embedded model
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


class _ShortRepr:
    """A section's repr names only the keys that differ from their defaults."""

    def __repr__(self) -> str:
        return short_repr(self)


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
    schema: str | None = None  # JSON Schema file for the answers (relative to the config file)

    def __repr__(self) -> str:
        return (
            f"AgentConfig(name={self.name!r}, model={self.model!r}, endpoint={self.endpoint!r}, "
            f"weight={self.weight}, concurrency={self.concurrency})"
        )


@dataclass(frozen=True, repr=False)
class LimitsConfig(_ShortRepr):
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
    max_invalid_retries: int = 2  # asks again for an answer that does not match its schema

    @property
    def max_line_bytes(self) -> int:
        return int(self.max_line_mb * (1 << 20))


@dataclass(frozen=True, repr=False)
class ServerConfig(_ShortRepr):
    """The model server parsl-chat starts when no endpoint is configured."""

    SECTION: ClassVar[str] = "server"

    kind: str = "embedded"  # embedded | none | command
    command: str | None = None  # template with {model} {host} {port}
    model: str = "smollm2-135m-instruct"  # name the server answers to
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    ready_path: str = "/v1/models"
    ready_timeout_s: float = 180.0
    context_tokens: int = 2048  # per request (per slot of a llama-server)
    # embedded only: llama.cpp's llama-server (parallel slots) when scripts/install built it,
    # else llama-cpp-python's server (one request at a time); or one of them on purpose
    engine: str = "auto"  # auto | llama-server | llama-cpp-python
    slots: int = 0  # llama-server's parallel requests; 0: sized from the job's cores
    # llama.cpp threads; 0: sized from the job's cores (llama_build.thread_counts): one sequence leaves
    # a core to the client, llama-server's batches of slots use every core when its build has OpenMP
    threads: int = 0  # generating one sequence
    batch_threads: int = 0  # prompts, and llama-server's batches of several slots
    max_restarts: int = 3  # a server that dies mid-run is restarted this often per node, then the run stops (exit 3)


@dataclass(frozen=True, repr=False)
class CostConfig(_ShortRepr):
    """Optional prices, turned into cost per run and per 1M tokens in reports."""

    SECTION: ClassVar[str] = "cost"

    su_per_node_hour: float | None = None
    usd_per_1m_prompt_tokens: float | None = None
    usd_per_1m_completion_tokens: float | None = None


@dataclass(frozen=True, repr=False)
class OutputConfig(_ShortRepr):
    """How the results files are written."""

    SECTION: ClassVar[str] = "output"

    flatten: bool = False  # one typed column per top-level schema property
    errors_in_output: bool = False  # output.jsonl keeps error lines too (before errors.jsonl existed)


@dataclass(frozen=True, repr=False)
class CacheConfig(_ShortRepr):
    """The response cache shared across runs (see parsl_chat/io/cache/); off without a directory."""

    SECTION: ClassVar[str] = "cache"

    dir: str | None = None  # a directory every node can reach (NFS, Lustre, GPFS); None: no cache
    mode: str = "read_write"  # read_write | read | off
    sampled: bool = False  # also cache answers drawn with temperature > 0 (or unset: servers default to 1)


@dataclass(frozen=True)
class RunConfig:
    """What runs: the agents, how prompts are routed to them, limits, server."""

    SECTION: ClassVar[str] = ""

    endpoint: str | None = None
    model: str | None = None
    api_key: Secret | None = None
    agents: tuple[AgentConfig, ...] = ()
    agent_count: int = 3  # YAML spells it ``agent_count``; the CLI ``--agents``
    routing: str = "round_robin"
    max_failures: str = "0"
    schema: str | None = None  # JSON Schema file for every agent without its own
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __repr__(self) -> str:
        return short_repr(self, always=("agents",))


#: the run config's sections, by their YAML key (each a mapping of its own keys)
NESTED: dict[str, type] = {
    "limits": LimitsConfig,
    "server": ServerConfig,
    "cost": CostConfig,
    "output": OutputConfig,
    "cache": CacheConfig,
}


def field_names(cls: type) -> list[str]:
    """A section's keys, in the order they are declared (and listed in messages)."""
    return [f.name for f in dataclasses.fields(cls)]


def type_hints(cls: type) -> dict[str, Any]:
    """Each key's declared type (each base class's annotations resolve in its own module)."""
    return typing.get_type_hints(cls)


def short_repr(config: Any, always: tuple[str, ...] = ()) -> str:
    """``Class(key=value, ...)`` with the ``always`` keys and those that differ from their defaults:
    a profile or run config has some 30 keys, of which a reader wants the few that were set."""
    shown = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if f.name in always or value != default:
            shown.append(f"{f.name}={value!r}")
    return f"{type(config).__name__}({', '.join(shown)})"
