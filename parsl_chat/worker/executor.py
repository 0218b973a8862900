"""Running chunks of prompts: the worker side.

A *chunk* is a list of work items (a prompt, or all turns of a conversation)
sent to one worker as one task. The worker runs the chunk's requests
concurrently on a persistent event loop, with per-agent slots, and returns one
row per prompt. The same :func:`run_chunk` runs under Parsl
(:mod:`parsl_chat.backends.parsl`) and in-process (:mod:`parsl_chat.backends.inprocess`), so
``--no-parsl`` exercises the very code the cluster runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from ..config import CacheConfig, LimitsConfig
from ..core.agents import UNFINISHED, AgentSpec, Outcome, RequestFailure, build_body, chat_completion
from ..core.limits import AgentLimits
from ..core.routing import LeastLoaded
from ..core.structured import check_answer, expectation_for, until_valid
from ..io import cache
from ..io.rows import LedgerRow, Place, Row, ServerTimes
from ..serve.supervision import ServerWatch

__all__ = [
    "ChunkTask",
    "WorkItem",
    "driver_worker_name",
    "iso",
    "lost_rows",
    "run_chunk",
    "unfinished_rows",
    "where_am_i",
]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC with microseconds (the ledger's timestamp format)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds")


@dataclass
class WorkItem:
    """One unit a single agent slot handles: a prompt, or a conversation's turns in order."""

    prompts: list[dict[str, Any]]  # Prompt.to_dict() plus "digest"
    agent: int | None  # None: the first free slot decides (least_loaded)
    submitted_at: float = 0.0


@dataclass
class ChunkTask:
    """Everything a worker needs to run one chunk; pickled to the worker."""

    run_id: str
    chunk_id: int
    agents: list[AgentSpec]
    slots: list[int]  # per-agent concurrency in this worker
    limits: LimitsConfig
    items: list[WorkItem]
    stop_file: str | None = None  # when it exists, start nothing new (shared filesystem signal)
    node_server: Any = None  # ServerConfig when each node runs its own model server
    extra: dict[str, Any] = field(default_factory=dict)
    cache: CacheConfig | None = None  # the response cache (cache.prepare()d), looked up here on the worker


def driver_worker_name(node: str) -> str:
    """The ``worker`` column of rows run in this process itself, not by a Parsl worker."""
    return f"{node}/p{os.getpid()}"


def where_am_i() -> Place:
    """Placement columns for the rows this process produces."""
    hostname = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME") or os.environ.get("PARSL_CHAT_POD_NODE") or hostname
    rank = os.environ.get("PARSL_WORKER_RANK")
    # several pods share a Kubernetes node: name the pod, so workers stay distinct
    host = os.environ.get("PARSL_CHAT_POD_NAME") or node
    # in-process chunks (--no-parsl, a warm start's first ones) share one process's agent limits:
    # the process is the worker, whichever of its threads ran the chunk
    worker = f"{host}/w{rank}" if rank is not None else driver_worker_name(node)
    return {
        "hostname": hostname,
        "node": node,
        "worker": worker,
        "block": os.environ.get("PARSL_WORKER_BLOCK_ID"),
        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PARSL_CHAT_POD_NAME"),
    }


# --------------------------------------------------------------------------- worker side


class _WorkerState:
    """Per-process state kept across chunks: one event loop, pooled connections, limits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="parsl-chat-loop", daemon=True)
        self.thread.start()
        self.client: aiohttp.ClientSession | None = None
        self.limits: dict[tuple[str, str], AgentLimits] = {}
        #: restarts this node's model server; a thread that lives as long as the process,
        #: since the server dies with the thread that started it
        self.server_starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parsl-chat-server")

    def get_client(self) -> aiohttp.ClientSession:
        """Called on the loop thread (a session binds to its loop)."""
        if self.client is None:
            self.client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), timeout=aiohttp.ClientTimeout(total=None)
            )
        return self.client

    def limits_for(self, run_id: str, agent: AgentSpec, slots: int, cfg: LimitsConfig) -> AgentLimits:
        key = (run_id, agent.name)
        lim = self.limits.get(key)
        if lim is None or lim.max_slots != slots:
            shared = None
            if cfg.requests_per_minute or cfg.tokens_per_minute:
                from ..serve.node import node_state_dir

                shared = node_state_dir(run_id) / "limits" / agent.name
            lim = AgentLimits(slots, cfg.requests_per_minute, cfg.tokens_per_minute, shared_dir=shared)
            self.limits[key] = lim
        return lim


_STATE: _WorkerState | None = None
_STATE_LOCK = threading.Lock()


def _state() -> _WorkerState:
    global _STATE
    with _STATE_LOCK:
        if _STATE is None or not _STATE.thread.is_alive():
            _STATE = _WorkerState()
        return _STATE


def warm_worker() -> int:
    """A no-op task that makes a worker import this module and start its loop (warm start)."""
    _state()
    return os.getpid()


def close_client() -> None:
    """Close this process's HTTP session (in-process backend shutdown): no 'Unclosed client session' noise."""
    state = _STATE
    if state is not None and state.client is not None and state.thread.is_alive():
        client, state.client = state.client, None
        try:
            asyncio.run_coroutine_threadsafe(client.close(), state.loop).result(timeout=5)
        except Exception:
            pass


def run_chunk(task: ChunkTask) -> list[LedgerRow]:
    """Run one chunk and return a row per prompt it finished (the Parsl app body)."""
    state = _state()
    future = asyncio.run_coroutine_threadsafe(_run_chunk(task, state), state.loop)
    return future.result()


async def _run_chunk(task: ChunkTask, state: _WorkerState) -> list[LedgerRow]:
    """A row per prompt: final ones (ok or error) and, for prompts a stop, a drain or a model server
    that is gone cut short, ``unfinished`` ones the driver does not record (:func:`unfinished_rows`)."""
    place = where_am_i()
    stopping = _stop_check(task.stop_file)
    agents = task.agents
    if task.node_server is not None:
        agents = _with_node_server(task)
    watches = _server_watches(task, agents, state, stopping)
    client = state.get_client()
    limits = [state.limits_for(task.run_id, a, s, task.limits) for a, s in zip(agents, task.slots, strict=True)]
    own: list[deque[WorkItem]] = [deque() for _ in agents]
    shared: deque[WorkItem] = deque()
    for item in task.items:
        (shared if item.agent is None else own[item.agent]).append(item)
    rows: list[LedgerRow] = []
    balance = LeastLoaded(limits, task.slots, shared)

    async def slot_loop(idx: int) -> None:
        agent, lim, watch = agents[idx], limits[idx], watches.get(agents[idx].endpoint)
        while True:
            if stopping() or (watch is not None and watch.gone is not None):
                return  # the rest of the chunk goes back to the driver unstarted
            if own[idx]:
                item = own[idx].popleft()
            elif shared:
                taken = await balance.take(idx, lambda: lim.refresh_server_load(client, agent), stopping)
                if taken is None:
                    return
                item = taken
            else:
                return
            finished = await _run_item(item, agent, lim, client, task, place, stopping, watch)
            rows.extend(finished)
            await balance.answered_one()
            if finished and finished[-1]["status"] == UNFINISHED:
                return

    async def counted(idx: int) -> None:
        async with balance.running(idx):
            await slot_loop(idx)

    runners = [asyncio.create_task(counted(i)) for i, s in enumerate(task.slots) for _ in range(s)]
    await asyncio.gather(*runners)
    return rows


def _stop_check(stop_file: str | None) -> Callable[[], bool]:
    """Whether ``stop_file`` exists: start nothing new, retry nothing. Checked at most every 0.2 s."""
    checked = [0.0, False]

    def stopping() -> bool:
        # a stat per item is cheap, but at thousands of items/s it is worth rate-limiting
        if stop_file is None:
            return False
        now = time.monotonic()
        if now - checked[0] > 0.2:
            checked[0] = now
            checked[1] = os.path.exists(stop_file)
        return bool(checked[1])

    return stopping


def _server_watches(
    task: ChunkTask, agents: list[AgentSpec], state: _WorkerState, stopping: Callable[[], bool]
) -> dict[str, ServerWatch]:
    """A watch per model server that parsl-chat runs for this chunk's agents, by endpoint."""
    watches: dict[str, ServerWatch] = {}
    driver_server = task.extra.get("driver_server")
    placeholder = task.extra.get("node_endpoint_placeholder")
    for before, agent in zip(task.agents, agents, strict=True):
        if agent.endpoint in watches:
            continue
        if task.node_server is not None and before.endpoint == placeholder:
            watches[agent.endpoint] = ServerWatch(
                agent.endpoint, stopping=stopping, restart=lambda: _node_server_url(task), starter=state.server_starter
            )
        elif driver_server is not None and agent.endpoint == driver_server:
            wait_s = float(task.extra.get("driver_server_wait_s") or 60.0)
            watches[agent.endpoint] = ServerWatch(agent.endpoint, stopping=stopping, wait_s=wait_s)
    return watches


#: a row as a LedgerRow or as the plain dict the driver holds
_AnyRow = TypeVar("_AnyRow", bound=Mapping[str, Any])


def unfinished_rows(rows: list[_AnyRow]) -> tuple[list[_AnyRow], list[_AnyRow]]:
    """``(final, unfinished)``: the rows to record, and those the run's own transitions cut short."""
    final = [row for row in rows if row["status"] != UNFINISHED]
    if len(final) == len(rows):
        return rows, []
    return final, [row for row in rows if row["status"] == UNFINISHED]


def lost_rows(task: ChunkTask, why: str) -> list[LedgerRow]:
    """One error row per prompt of a chunk that never came back (its worker died): ``why`` says so."""
    now = iso(time.time())
    return [
        {
            "custom_id": prompt["custom_id"],
            "line": prompt["line"],
            "agent": task.agents[item.agent].name if item.agent is not None else None,
            "conversation": prompt.get("conversation"),
            "turn": prompt.get("turn"),
            "status": "error",
            "error_type": "other",
            "error": why[:500],
            "attempts": 0,
            "submitted_at": iso(item.submitted_at),
            "finished_at": now,
            "digest": prompt.get("digest"),
        }
        for item in task.items
        for prompt in item.prompts
    ]


async def _run_item(
    item: WorkItem,
    agent: AgentSpec,
    lim: AgentLimits,
    client: aiohttp.ClientSession,
    task: ChunkTask,
    place: Place,
    stopping: Callable[[], bool],
    watch: ServerWatch | None,
) -> list[LedgerRow]:
    """The item's rows; one ``unfinished`` row per prompt if any turn of it was cut short.

    A conversation is all or nothing: its turns run in order on one agent, so a turn cut
    short sends the whole conversation again (its earlier answers are not recorded).
    """
    rows: list[LedgerRow] = []
    history: list[dict[str, Any]] = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
    failed_turn: int | None = None
    for prompt in item.prompts:
        messages = list(prompt["messages"])
        if messages and messages[0].get("role") in ("system", "developer"):
            history = []  # the prompt brings its own system prompt
        if failed_turn is not None:
            outcome, cache_columns = _not_sent(failed_turn), Row()
        else:
            ask = _asker(prompt, history + messages, agent, lim, client, task, stopping, watch)
            outcome, cache_columns = await _answer(prompt, history + messages, agent, task, ask, stopping)
            if outcome.status == UNFINISHED:
                gone = watch.gone if watch is not None else None
                return [_unfinished_row(p, item, gone or outcome.error, server_down=gone is not None) for p in item.prompts]
        rows.append({**_row(prompt, agent, outcome, item.submitted_at, place), **cache_columns})
        if outcome.status != "ok" and failed_turn is None and prompt.get("conversation") is not None:
            failed_turn = prompt.get("turn") or 0
        history = history + messages + [{"role": "assistant", "content": outcome.response or ""}]
    return rows


def _not_sent(failed_turn: int) -> Outcome:
    return Outcome(
        status="error",
        attempts=0,
        started_at=None,
        finished_at=None,
        error_type="other",
        error=f"not sent: turn {failed_turn} of this conversation failed",
    )


async def _answer(
    prompt: dict[str, Any],
    messages: list[dict[str, Any]],
    agent: AgentSpec,
    task: ChunkTask,
    ask: Callable[[], Awaitable[Outcome]],
    stopping: Callable[[], bool],
) -> tuple[Outcome, Row]:
    """The prompt's answer and its cache columns: from the cache if it holds a valid one, else asked for.

    The cache is asked before a slot is taken: a hit costs no slot, no rate budget, no request.
    """
    expectation = expectation_for(agent.params, prompt.get("params"))
    query = cache.query(task.cache, _body(agent, messages, prompt)) if task.cache is not None else None
    hit = query.lookup() if query is not None else None
    if hit is not None:
        outcome = Outcome(**cache.hit_outcome(hit))
        problem = None
        if expectation is not None:  # a hit fills 'parsed' as an answer does
            outcome.parsed, problem = check_answer(outcome.response, expectation)
        if problem is None:
            return outcome, cache.row_columns(query, hit)
        hit = None  # kept before its schema was checked here: ask again
    outcome = await until_valid(ask, expectation, task.limits.max_invalid_retries, stopping)
    if query is not None:
        query.save(outcome, task.run_id)
    return outcome, cache.row_columns(query, hit)


def _body(agent: AgentSpec, messages: list[dict[str, Any]], prompt: dict[str, Any]) -> dict[str, Any]:
    """The request body chat_completion sends for ``prompt``: what the cache key is made of."""
    return build_body(agent, messages, prompt.get("model"), prompt.get("params") or {})


def _asker(
    prompt: dict[str, Any],
    messages: list[dict[str, Any]],
    agent: AgentSpec,
    lim: AgentLimits,
    client: aiohttp.ClientSession,
    task: ChunkTask,
    stopping: Callable[[], bool],
    watch: ServerWatch | None,
) -> Callable[[], Awaitable[Outcome]]:
    """One request for ``prompt`` in one of the agent's slots, behind its rate limits (each ask again is one)."""

    def note(failure: RequestFailure) -> None:
        lim.on_failure(failure.error_type)

    async def ask() -> Outcome:
        async with lim.slot():
            await lim.admit(prompt)
            outcome = await chat_completion(
                client,
                agent,
                messages,
                model=prompt.get("model"),
                params=prompt.get("params"),
                max_attempts=task.limits.max_attempts,
                timeout_s=task.limits.timeout_s,
                backoff_s=task.limits.backoff_s,
                backoff_max_s=task.limits.backoff_max_s,
                on_failure=note,
                should_stop=stopping,
                recover=watch.recover if watch is not None else None,
            )
        if outcome.status == "ok":
            if outcome.finished_at is not None and outcome.started_at is not None:
                lim.observe_latency(outcome.finished_at - outcome.started_at, outcome.server_s)
            lim.on_success(outcome.completion_tokens or 0, outcome.prompt_tokens or 0)
        return outcome

    return ask


def _unfinished_row(prompt: dict[str, Any], item: WorkItem, why: str | None, *, server_down: bool) -> LedgerRow:
    """What the driver learns of a prompt cut short: which one, why, and whether its model server is gone."""
    return {
        "custom_id": prompt["custom_id"],
        "line": prompt["line"],
        "status": UNFINISHED,
        "error_type": "server_down" if server_down else "interrupted",
        "error": why,
        "submitted_at": iso(item.submitted_at),
    }


def _row(prompt: dict[str, Any], agent: AgentSpec, outcome: Outcome, submitted_at: float, place: Place) -> LedgerRow:
    started = outcome.started_at
    return {
        "custom_id": prompt["custom_id"],
        "line": prompt["line"],
        "agent": agent.name,
        "model": outcome.model or prompt.get("model") or agent.model,
        "endpoint": agent.endpoint,
        **place,
        "conversation": prompt.get("conversation"),
        "turn": prompt.get("turn"),
        "status": outcome.status,
        "error_type": outcome.error_type,
        "error": outcome.error,
        "attempts": outcome.attempts,
        "submitted_at": iso(submitted_at),
        "started_at": iso(started),
        "finished_at": iso(outcome.finished_at),
        "queue_s": round(started - submitted_at, 6) if started is not None else None,
        "latency_s": round(outcome.finished_at - started, 6) if started is not None and outcome.finished_at else None,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "finish_reason": outcome.finish_reason,
        "response": outcome.response,
        "parsed": outcome.parsed,
        **_server_times(outcome),
        "digest": prompt.get("digest"),
    }


def _node_server_url(task: ChunkTask) -> str:
    """This node's model server for the run, started (or restarted, within its limit) if it is not up."""
    from ..serve.node import node_server

    log_dir = task.extra.get("log_dir")
    return node_server(
        task.node_server,
        task.run_id,
        driver=task.extra.get("driver_session"),
        crash_dir=Path(log_dir) if log_dir and os.path.isdir(log_dir) else None,
    )


def _server_times(outcome: Outcome) -> ServerTimes:
    """Where the server spent a request's latency, from its per-response timings (llama-server):
    reading the prompt, generating, and the rest, which is waiting for a slot (plus the HTTP round trip)."""
    prompt_s, generation_s, server_s = outcome.server_prompt_s, outcome.server_generation_s, outcome.server_s
    wait_s = None
    if server_s is not None and outcome.started_at is not None and outcome.finished_at is not None and outcome.attempts == 1:
        wait_s = round(max(0.0, outcome.finished_at - outcome.started_at - server_s), 6)
    return {"server_queue_s": wait_s, "server_prompt_s": prompt_s, "server_generation_s": generation_s}


def _with_node_server(task: ChunkTask) -> list[AgentSpec]:
    """Point agents without an endpoint of their own at this node's model server.

    Asked on every chunk (a lock and a connect, cheap): if the worker that started
    the server has gone, the server went with it and this call starts a new one.
    Called on the worker's long-lived loop thread, which the server's lifetime is tied to.
    """
    url = _node_server_url(task)
    placeholder = task.extra.get("node_endpoint_placeholder")
    return [replace(a, endpoint=url) if a.endpoint == placeholder else a for a in task.agents]
