"""What a run will do: its fleet of agents, slots per worker, chunk size, the work items still to send, the dry run."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..backends.targets import model_servers, target_for
from ..config import Secret, Settings
from ..core.agents import AgentSpec, resolve_agents
from ..core.routing import Router
from ..errors import ConfigError
from ..io.ledger import LedgerIndex, digest_matches
from ..io.prompts import LineProblem, PromptSource, ScanResult, iter_prompts
from ..worker.executor import WorkItem
from .options import RunOptions, RunOutcome

__all__ = [
    "NODE_LOCAL_ENDPOINT",
    "chunk_size",
    "describe_fleet",
    "dry_run",
    "effective_concurrency",
    "endpoint_and_server",
    "fleet_lines",
    "slots_per_worker",
    "work_items",
]

log = logging.getLogger("parsl_chat.run")

#: agents' endpoint while each node's own model server is not yet known
NODE_LOCAL_ENDPOINT = "node-local://model-server/v1"


def endpoint_and_server(settings: Settings, local_driver: bool) -> tuple[str | None, str, Secret | None, str]:
    """(endpoint, model, api key, how): ``how`` is 'given', 'driver' or 'per-node'."""
    run = settings.run
    model = run.model or run.server.model
    if run.endpoint or (run.agents and all(a.endpoint for a in run.agents)):
        return run.endpoint, run.model or "default", run.api_key, "given"
    if run.server.kind == "none":
        raise ConfigError(
            "no endpoint configured and the model server is disabled (server.kind: none)",
            hint="give --endpoint URL --model NAME, set OPENAI_BASE_URL, or set server.kind to embedded",
        )
    return None, model, run.api_key, "driver" if local_driver else "per-node"


def chunk_size(slots: list[int], workers: int, total: int, configured: int) -> int:
    if configured > 0:
        return configured
    per_worker = sum(slots)
    size = per_worker * 4  # four rounds of the worker's slots: keeps slots busy, results flowing
    spread = math.ceil(total / (2 * workers)) if total else size  # small runs still use every worker
    return max(1, min(size, spread, 512))


def slots_per_worker(agents: list[AgentSpec], workers: int, in_process: bool) -> list[int]:
    if in_process:  # one process shares each agent's limit across all its chunks
        return [a.concurrency for a in agents]
    return [max(1, round(a.concurrency / workers)) for a in agents]


def effective_concurrency(
    agents: list[AgentSpec], slots: list[int], workers: int, in_process: bool, console: Console
) -> list[AgentSpec]:
    """Each worker process gets a whole number of slots per agent: say so when that changes a limit the user set."""
    if in_process:
        return agents
    out = []
    for agent, share in zip(agents, slots, strict=True):
        effective = share * workers
        if effective != agent.concurrency:
            message = (
                f"agent {agent.name}: concurrency {agent.concurrency} over {workers} workers is {share} per worker, "
                f"so up to {effective} requests in flight (use a multiple of {workers} to be exact)"
            )
            if agent.concurrency_given:
                log.warning(message)
                console.print(f"note: {message}", markup=False, highlight=False)
            else:  # our own default: rounding it is ours too
                log.info(message)
        out.append(replace(agent, concurrency=effective))
    return out


def work_items(
    source: PromptSource,
    scanned: ScanResult,
    index: LedgerIndex | None,
    retry_failed: bool,
    force: bool,
    router: Router,
    skipped: list[LineProblem],
) -> Iterator[WorkItem]:
    """Stream work items: single prompts at once, conversations once their last turn is read."""
    open_convs: dict[str, list[dict[str, Any]]] = {}
    for item in iter_prompts(source, skip_lines=scanned.duplicate_lines):
        if isinstance(item, LineProblem):
            skipped.append(item)
            continue
        record = item.to_dict()
        record["digest"] = item.digest
        if item.conversation is not None:
            turns = open_convs.setdefault(item.conversation, [])
            turns.append(record)
            if scanned.conversation_ends.get(item.conversation) != item.line:
                continue
            del open_convs[item.conversation]
            if index is not None and all(_done(index, t["custom_id"], t["digest"], retry_failed, force) for t in turns):
                continue
            pin = next((t["agent"] for t in turns if t.get("agent")), None)
            yield WorkItem(prompts=turns, agent=router.assign(pin))
            continue
        if index is not None and _done(index, item.custom_id, record["digest"], retry_failed, force):
            continue
        yield WorkItem(prompts=[record], agent=router.assign(item.agent))


def _done(index: LedgerIndex, custom_id: str, digest: str, retry_failed: bool, force: bool) -> bool:
    """Whether the ledger already holds this prompt's final row."""
    found = index.lookup(custom_id)
    if found is None:
        return False
    ok, recorded = found
    if force and not digest_matches(recorded, digest):
        return False  # the prompt changed and --force accepted it: answer the new text
    return ok or not retry_failed


def dry_run(
    console: Console,
    settings: Settings,
    agents: list[AgentSpec],
    scanned: ScanResult,
    opts: RunOptions,
    how: str,
    run_dir: Path,
) -> RunOutcome:
    from ..backends.profiles import plan_lines

    lines = [f"prompts: {scanned.valid} valid" + (f", {scanned.problem_count} bad (skipped)" if scanned.problem_count else "")]
    lines += ["backend: in-process (--no-parsl)" if opts.no_parsl else "backend: Parsl HighThroughputExecutor"]
    lines += plan_lines(settings.profile) if not opts.no_parsl else [f"workers: {settings.profile.workers} threads"]
    server = {
        "given": "endpoints as configured",
        "driver": f"model server: {settings.run.server.kind} ({settings.run.server.model}) started on this machine",
        "per-node": f"model server: {settings.run.server.kind} ({settings.run.server.model}) started on each node",
    }[how]
    lines.append(server)
    lines += fleet_lines(settings.run.routing, agents, how)
    lines.append(f"output: {run_dir}")
    console.print("\n".join(lines), markup=False, highlight=False)
    return RunOutcome(run_dir, 0, {}, "dry run: nothing sent")


def fleet_lines(routing: str, agents: list[AgentSpec], how: str) -> list[str]:
    """The resolved fleet, one line per agent (``--dry-run`` and ``config show``); keys are never shown."""
    lines = [f"routing: {routing}; {len(agents)} agents, {sum(a.concurrency for a in agents)} requests in flight at most"]
    for agent in agents:
        endpoint = agent.endpoint
        if agent.endpoint == NODE_LOCAL_ENDPOINT:
            endpoint = "the embedded model server" if how == "driver" else "each node's model server"
        key = ", API key set" if agent.api_key else ""
        lines.append(
            f"  agent {agent.name}: model {agent.model}, {endpoint}, concurrency {agent.concurrency}, "
            f"weight {agent.weight:g}{key}"
        )
    return lines


def describe_fleet(settings: Settings) -> list[str]:
    """:func:`fleet_lines` for ``settings`` as a run would resolve them (``--agents N`` cycling included)."""
    endpoint, model, api_key, how = endpoint_and_server(settings, target_for(settings.profile).workers_on_driver)
    agents = resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key, model_servers(settings.profile))
    return fleet_lines(settings.run.routing, agents, how)
