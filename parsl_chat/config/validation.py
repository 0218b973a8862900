"""Checks across keys, after every value has its type: choices, ranges, endpoints, schema files.

Each message starts with where the value was set (:meth:`Source.where`).
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from .profiles import EXECUTORS, ProfileConfig, executors_taking, profile_class
from .schema import CACHE_MODES, ROUTINGS, SERVER_ENGINES, SERVER_KINDS, RunConfig
from .settings import DEFAULT, Source

__all__ = ["check_endpoint", "check_profile", "parse_max_failures", "validate_run"]


def _where(sources: dict[str, Source], key: str) -> str:
    return sources.get(key, DEFAULT).where()


def check_profile(profile: ProfileConfig, sources: dict[str, Source]) -> None:
    """A known executor, only its own keys set in YAML, and blocks that add up."""
    own = profile_class(profile.executor)
    if own is None:
        where = _where(sources, "profile.executor")
        raise ConfigError(f"{where}: unknown executor {profile.executor!r}; valid executors: {', '.join(EXECUTORS)}")
    valid = {f.name for f in dataclasses.fields(own)}
    for key in (f.name for f in dataclasses.fields(ProfileConfig)):
        src = sources.get(f"profile.{key}")
        # only YAML is held to it: an environment variable may be set for several profiles at once
        if src is not None and src.kind == "yaml" and key not in valid:
            raise ConfigError(
                f"{src.detail}: '{key}' applies only to executor {' or '.join(executors_taking(key))}, "
                f"but this profile's executor is {profile.executor!r}"
            )
    for key in ("workers", "nodes_per_block", "max_blocks"):
        if getattr(profile, key) < 1:
            raise ConfigError(f"{_where(sources, 'profile.' + key)}: '{key}' must be at least 1")
    if profile.min_blocks > profile.max_blocks or profile.init_blocks > profile.max_blocks:
        raise ConfigError(f"{_where(sources, 'profile.max_blocks')}: init_blocks and min_blocks must not exceed max_blocks")


def _run_problems(run: RunConfig) -> Iterator[tuple[str, str]]:
    """(key, problem) of the run config's own values, in the order they are reported."""
    server, limits = run.server, run.limits
    if run.routing not in ROUTINGS:
        yield "routing", f"unknown routing {run.routing!r}; valid: {', '.join(ROUTINGS)}"
    if server.kind not in SERVER_KINDS:
        yield "server.kind", f"unknown server kind {server.kind!r}; valid: {', '.join(SERVER_KINDS)}"
    if server.engine not in SERVER_ENGINES:
        yield "server.engine", f"unknown server engine {server.engine!r}; valid: {', '.join(SERVER_ENGINES)}"
    if server.slots < 0:
        yield "server.slots", "'server.slots' must be 0 (from the cores) or more"
    for key in ("threads", "batch_threads"):
        if getattr(server, key) < 0:
            yield f"server.{key}", f"'server.{key}' must be 0 (from the cores) or more"
    if server.kind == "command" and not server.command:
        yield "server.kind", "server kind 'command' needs 'server.command'"
    if run.cache.mode not in CACHE_MODES:
        yield "cache.mode", f"unknown cache mode {run.cache.mode!r}; valid: {', '.join(CACHE_MODES)}"
    if run.agent_count < 1:
        yield "agent_count", "the number of agents must be at least 1"
    if limits.concurrency < 1:
        yield "limits.concurrency", "'limits.concurrency' must be at least 1"
    if limits.max_attempts < 1:
        yield "limits.max_attempts", "'limits.max_attempts' must be at least 1"
    if not limits.max_line_mb > 0:
        yield "limits.max_line_mb", "'limits.max_line_mb' must be positive"
    if server.max_restarts < 0:
        yield "server.max_restarts", "'server.max_restarts' must be 0 or more"


def validate_run(run: RunConfig, sources: dict[str, Source]) -> None:
    """Every check of the run config; the first problem found is the error."""
    first = next(_run_problems(run), None)
    if first is not None:
        raise ConfigError(f"{_where(sources, first[0])}: {first[1]}")
    check_endpoint(run.endpoint, _where(sources, "endpoint"))
    for agent in run.agents:
        check_endpoint(agent.endpoint, _where(sources, f"agents.{agent.name}.endpoint"))
        if agent.concurrency is not None and agent.concurrency < 1:
            raise ConfigError(f"{_where(sources, f'agents.{agent.name}.concurrency')}: agent concurrency must be at least 1")
        if agent.weight <= 0:
            raise ConfigError(f"{_where(sources, f'agents.{agent.name}.weight')}: agent weight must be positive")
    parse_max_failures(run.max_failures, _where(sources, "max_failures"))
    _validate_structured(run, sources)


def _validate_structured(run: RunConfig, sources: dict[str, Source]) -> None:
    """Schema files load and are JSON Schemas; an agent's own response_format is OpenAI's spelling."""
    from ..core.structured import check_response_format, load_schema_file

    if run.limits.max_invalid_retries < 0:
        raise ConfigError(f"{_where(sources, 'limits.max_invalid_retries')}: 'limits.max_invalid_retries' must be 0 or more")
    if run.schema is not None:
        load_schema_file(Path(run.schema), _where(sources, "schema"))
    for agent in run.agents:
        if agent.schema is not None:
            where = _where(sources, f"agents.{agent.name}.schema")
            if "response_format" in agent.params:
                raise ConfigError(f"{where}: agent {agent.name!r} has both 'schema' and 'params.response_format'; keep one")
            load_schema_file(Path(agent.schema), where)
        if "response_format" in agent.params:
            problem = check_response_format(agent.params["response_format"])
            if problem:
                where = _where(sources, f"agents.{agent.name}.params")
                raise ConfigError(f"{where}: 'params.response_format' of agent {agent.name!r}: {problem}")


def check_endpoint(url: str | None, where: str) -> None:
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
