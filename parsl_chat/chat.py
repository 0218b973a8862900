"""``parsl-chat chat``: an interactive session with the same agents ``run`` uses.

:class:`ChatSession` holds the state (per-agent conversations, request
statistics, the lazily started batch backend) and implements every ``/command``
as a method listed in one dispatch table. :func:`run_repl` drives it from a
terminal (prompt_toolkit: line editing, history, completion); :func:`run_piped`
from standard input when that is not a terminal. :func:`run_chat` resolves the
settings exactly as ``run`` does, starts the embedded model server when no
endpoint is configured, and stops everything on the way out.

Named sessions (``--session NAME``) are kept on disk by :mod:`parsl_chat.sessions`;
restoring one restores each agent's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from ._files import atomic_write
from .agents import AgentSpec, RequestFailure, stream_chat
from .config import ServerConfig, Settings, load_settings
from .executor import Backend, ChunkTask, InProcessBackend, WorkItem, iso
from .prompts import Prompt
from .routing import Router
from .sessions import SESSION_VERSION, SessionStore, Turn, data_dir, list_sessions, sessions_dir

__all__ = [
    "ChatOptions",
    "ChatSession",
    "run_chat",
    "run_piped",
    "run_repl",
    "summarize_requests",
]

T = TypeVar("T")

#: used by ``/batch N`` without a prompt
SAMPLE_PROMPTS = (
    "Explain Amdahl's law in one sentence.",
    "What is a SLURM partition?",
    "Name one advantage of batching requests to a language model.",
    "What does parallel efficiency measure?",
    "Give a one-line definition of latency.",
)
MAX_BATCH = 100_000
HEALTH_TIMEOUT_S = 2.0


# --------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _public_url(url: str) -> str:
    """A URL without user:password (endpoints may carry credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _one_line(text: str, limit: int = 0) -> str:
    text = " ".join(text.split())
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# --------------------------------------------------------------------------- statistics


@dataclass
class RequestStat:
    """One request of this session (a chat turn or a /batch row), for /stats."""

    kind: str  # chat | batch
    agent: str
    status: str  # ok | error
    started: float
    finished: float
    completion_tokens: int = 0
    error_type: str | None = None
    ttft_s: float | None = None  # time to the first token (streamed chat only)

    @property
    def latency_s(self) -> float:
        return max(0.0, self.finished - self.started)


def _busy_union_s(intervals: Iterable[tuple[float, float]]) -> float:
    """Seconds during which at least one request was in flight."""
    total = 0.0
    end = -np.inf
    start = 0.0
    for a, b in sorted(intervals):
        if a > end:
            if end > -np.inf:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end > -np.inf:
        total += end - start
    return float(total)


def _pcts(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return float(p50), float(p95)


def summarize_requests(requests: list[RequestStat], agents: list[AgentSpec], wall_s: float) -> dict[str, Any]:
    """The figures /stats and /batch print (plain numbers; wall_s is the period they cover)."""
    ok = [r for r in requests if r.status == "ok"]
    errors: dict[str, int] = {}
    for r in requests:
        if r.status != "ok":
            errors[r.error_type or "other"] = errors.get(r.error_type or "other", 0) + 1
    p50, p95 = _pcts([r.latency_s for r in ok])
    t50, _ = _pcts([r.ttft_s for r in ok if r.ttft_s is not None])
    tokens = sum(r.completion_tokens for r in ok)
    busy_wall = _busy_union_s((r.started, r.finished) for r in requests)
    slots = sum(a.concurrency for a in agents)
    busy_agent_s = sum(r.latency_s for r in requests)
    wall = max(wall_s, 1e-9)
    per_agent = {}
    for a in agents:
        mine = [r for r in requests if r.agent == a.name]
        busy = sum(r.latency_s for r in mine)
        per_agent[a.name] = {
            "requests": len(mine),
            "errors": sum(1 for r in mine if r.status != "ok"),
            "busy_s": busy,
            "utilisation": busy / (a.concurrency * wall),
        }
    return {
        "requests": len(requests),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_type": errors,
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "first_token_p50_s": t50,
        "completion_tokens": tokens,
        "busy_wall_s": busy_wall,
        "tokens_per_s": tokens / busy_wall if busy_wall > 0 else None,
        "requests_per_s": len(ok) / wall,
        "wall_s": wall_s,
        "agent_slots": slots,
        "busy_agent_s": busy_agent_s,
        "parallel_efficiency": busy_agent_s / (slots * wall) if slots else None,
        "agents": per_agent,
    }


def _s(value: float | None, unit: str = " s", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------- the event loop for requests


class _Loop:
    """A private asyncio loop in a thread: requests run there while the main thread owns the terminal."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="parsl-chat-chat-loop", daemon=True)
        self.thread.start()
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=None)
        return self._client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; Ctrl-C cancels it and propagates."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            with contextlib.suppress(Exception, KeyboardInterrupt):
                future.result(timeout=2)
            raise

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._client.aclose(), self.loop).result(timeout=5)
            self._client = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- the session


class Command(NamedTuple):
    func: Callable[[str], bool | None]
    usage: str
    help: str


@dataclass
class ChatConfig:
    """How the session runs its agents (resolved by :func:`run_chat`)."""

    settings: Settings
    agents: list[AgentSpec]
    no_parsl: bool = False
    runtime_dir: Path = field(default_factory=lambda: data_dir() / "logs" / "chat")
    #: /batch agents when they differ from the chat's (workers on other nodes start their own server)
    batch_agents: list[AgentSpec] | None = None
    node_server: ServerConfig | None = None
    node_placeholder: str | None = None
    label: str = "chat"


class _Answer:
    """One streamed answer on the screen: ``agent: `` then the tokens as they come.

    On a terminal the prefix shows at once (and is wiped if nothing but an error
    follows); in piped mode it is written with the first token, so a failed turn
    leaves only its ``error:`` line.
    """

    def __init__(self, session: ChatSession, agent: str) -> None:
        self.session = session
        self.agent = agent
        self.pieces: list[str] = []
        self.usage: dict[str, Any] = {}
        self.started = time.time()
        self.first: float | None = None
        self.finished = self.started
        self.shown = False
        if session.interactive:
            self._prefix()

    def _prefix(self) -> None:
        s = self.session
        if s.interactive:
            s.console.print(f"{self.agent}: ", style="bold cyan", end="", markup=False, highlight=False)
        else:
            s.out.write(f"{self.agent}: ")
        self.shown = True

    def add(self, piece: str) -> None:
        if self.first is None:
            self.first = time.time()
            piece = piece.lstrip()
        if not self.shown:
            self._prefix()
        self.pieces.append(piece)
        self.session.out.write(piece)
        self.session.out.flush()

    def end(self, failed: bool) -> None:
        self.finished = time.time()
        out = self.session.out
        if failed and not self.pieces and self.shown:
            out.write("\r\x1b[2K")  # only on a terminal: nothing came but an error
        elif self.shown or not failed:
            if not self.shown:
                self._prefix()
            out.write("\n")
        out.flush()

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    @property
    def tokens(self) -> int:
        # llama.cpp's server sends no usage when streaming: one chunk is one token there
        return int(self.usage.get("completion_tokens") or len(self.pieces))

    @property
    def ttft(self) -> float | None:
        return self.first - self.started if self.first is not None else None


def _http_message(message: str) -> str:
    """``HTTP 500: {"error": {"message": ...}}`` (a streamed request's raw body) as ``HTTP 500: message``."""
    head, sep, body = message.partition(": ")
    if sep and head.startswith("HTTP ") and body.lstrip().startswith("{"):
        try:
            data = json.loads(body)
            error = data.get("error")
            text = error.get("message") if isinstance(error, dict) else error
            if text:
                return f"{head}: {text}"
        except (ValueError, AttributeError):
            pass
    return message


class ChatSession:
    """State and commands of one chat; the REPL and the pipe reader only feed it lines."""

    def __init__(
        self,
        cfg: ChatConfig,
        *,
        store: SessionStore | None = None,
        out: IO[str] | None = None,
        console: Console | None = None,
        err_console: Console | None = None,
        interactive: bool = False,
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.settings
        self.agents = list(cfg.agents)
        self.by_name = {a.name: a for a in self.agents}
        self.router = Router(self.agents, "round_robin")
        self.store = store
        self.label = store.name if store is not None else cfg.label
        self.out = out or sys.stdout
        self.console = console or Console(file=self.out, highlight=False, soft_wrap=True)
        self.err_console = err_console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.interactive = interactive
        self.started = time.time()
        self.run_id = f"chat-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
        self.turns: list[Turn] = []
        self.epochs: dict[str, int] = {a.name: 1 for a in self.agents}
        self.requests: list[RequestStat] = []
        self.pinned: str | None = None
        self.batches = 0
        self.created_at = _now_iso()
        self._loop = _Loop()
        self._backend: Backend | None = None
        self._secrets = [a.api_key.reveal() for a in self.agents if a.api_key is not None and a.api_key.reveal()]
        self.commands: dict[str, Command] = {
            "help": Command(self.cmd_help, "/help", "list the commands"),
            "stats": Command(
                self.cmd_stats, "/stats", "requests, errors, latency p50/p95, tokens/s, per-agent use, parallel efficiency"
            ),
            "batch": Command(self.cmd_batch, "/batch N [prompt]", "send N requests in parallel across the agents (Parsl)"),
            "agents": Command(self.cmd_agents, "/agents", "the fleet: models, endpoints, routing and health"),
            "agent": Command(self.cmd_agent, "/agent [NAME]", "talk to one agent; /agent alone returns to round-robin"),
            "history": Command(self.cmd_history, "/history [N]", "the conversation so far (the last N turns)"),
            "reset": Command(self.cmd_reset, "/reset [NAME]", "forget the conversation (of every agent, or of NAME)"),
            "save": Command(self.cmd_save, "/save PATH", "write the transcript as JSONL that 'parsl-chat run' replays"),
            "quit": Command(self.cmd_quit, "/quit", "leave (also /exit, Ctrl-D); a --session is kept on disk"),
        }
        self.aliases = {"exit": "quit", "q": "quit", "?": "help"}

    def __repr__(self) -> str:
        return f"ChatSession({self.label!r}, agents={[a.name for a in self.agents]}, turns={len(self.turns)})"

    # ------------------------------------------------------------------ output

    def say(self, text: str = "", style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def note(self, text: str) -> None:
        """A status line on stderr (dim on a terminal)."""
        self.err_console.print(text, style="dim", markup=False, highlight=False)

    def error(self, agent: str, error_type: str, message: str) -> None:
        self.err_console.print(
            f"error: {agent}: {error_type}: {_one_line(self._scrub(message))}", style="red", markup=False, highlight=False
        )

    def problem(self, text: str) -> None:
        """A user mistake in a command: one line, the session goes on."""
        self.err_console.print(text, style="yellow", markup=False, highlight=False)

    def _scrub(self, text: str) -> str:
        for value in self._secrets:
            text = text.replace(value, "***")
        return text

    # ------------------------------------------------------------------ persistence

    def conversation_id(self, agent: str) -> str:
        return f"{self.label}-{agent}-{self.epochs.get(agent, 1)}"

    def context(self, agent: str) -> list[dict[str, Any]]:
        """The messages this agent remembers: every turn of its current conversation."""
        conv = self.conversation_id(agent)
        messages: list[dict[str, Any]] = []
        for t in self.turns:
            if t.conversation == conv:
                messages += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.response}]
        return messages

    def restore(self) -> None:
        """Continue a saved session: turns (hence every agent's context) and conversation epochs."""
        if self.store is None:
            return
        data = self.store.load()
        if data is None:
            self.note(f"new session {self.label!r} (saved in {self.store.path})")
            return
        self.turns = [Turn.from_dict(t) for t in data.get("turns", [])]
        self.created_at = str(data.get("created_at") or self.created_at)
        for name, epoch in (data.get("epochs") or {}).items():
            self.epochs[name] = int(epoch)
        remembered = {a.name: len(self.context(a.name)) // 2 for a in self.agents}
        context = ", ".join(f"{n} {k}" for k, n in remembered.items() if n) or "none"
        self.note(
            f"session {self.label!r} restored: {len(self.turns)} turn(s), last used {data.get('updated_at', '?')}; "
            f"context: {context}"
        )
        gone = sorted({t.agent for t in self.turns} - set(self.by_name))
        if gone:
            self.note(f"note: agent(s) {', '.join(gone)} of this session are not in the current fleet; their turns are kept")

    def persist(self) -> None:
        if self.store is None:
            return
        data = {
            "version": SESSION_VERSION,
            "name": self.label,
            "created_at": self.created_at,
            "updated_at": _now_iso(),
            "agents": [{**a.describe(), "endpoint": _public_url(a.endpoint)} for a in self.agents],
            "epochs": self.epochs,
            "turns": [asdict(t) for t in self.turns],
        }
        try:
            self.store.save(data)
        except OSError as exc:
            self.problem(f"warning: could not save the session to {self.store.path}: {exc.strerror}")

    # ------------------------------------------------------------------ input

    def prompt_text(self) -> str:
        return f"you@{self.pinned}> " if self.pinned else "you> "

    def handle(self, line: str) -> bool:
        """One line of input; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("//"):  # a message that starts with a slash
            self.ask(text[1:])
            return True
        if not text.startswith("/"):
            self.ask(text)
            return True
        name, _, arg = text[1:].partition(" ")
        name = self.aliases.get(name.lower(), name.lower())
        command = self.commands.get(name)
        if command is None:
            close = difflib.get_close_matches(name, list(self.commands) + list(self.aliases), n=1, cutoff=0.5)
            guess = self.aliases.get(close[0], close[0]) if close else None
            hint = f"; did you mean /{guess}?" if guess else ""
            self.problem(f"unknown command /{name}{hint} (/help lists the commands)")
            return True
        return command.func(arg.strip()) is not False

    # ------------------------------------------------------------------ asking

    def ask(self, text: str) -> None:
        """Send one message to the next agent (or the pinned one) and stream its answer."""
        idx = self.router.assign(self.pinned)
        agent = self.agents[idx if idx is not None else 0]
        messages = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
        messages += [*self.context(agent.name), {"role": "user", "content": text}]
        answer = _Answer(self, agent.name)
        failure: tuple[str, str] | None = None
        try:
            self._loop.run(self._stream(agent, messages, answer))
        except RequestFailure as exc:
            failure = (exc.error_type, _http_message(str(exc)))
        except KeyboardInterrupt:
            failure = ("interrupted", "answer interrupted (Ctrl-C)")
        except (httpx.HTTPError, ValueError) as exc:  # odd URLs, malformed stream chunks
            failure = ("other" if isinstance(exc, httpx.HTTPError) else "server_error", f"{type(exc).__name__}: {exc}")
        answer.end(failed=failure is not None)
        s = answer
        if failure is not None:
            self.requests.append(RequestStat("chat", agent.name, "error", s.started, s.finished, 0, failure[0], s.ttft))
            self.error(agent.name, *failure)
            if failure[0] == "context_length":
                self.problem(f"hint: /reset {agent.name} starts its conversation afresh")
            return
        self.requests.append(RequestStat("chat", agent.name, "ok", s.started, s.finished, s.tokens, None, s.ttft))
        self.turns.append(
            Turn(
                n=(self.turns[-1].n + 1) if self.turns else 1,
                agent=agent.name,
                conversation=self.conversation_id(agent.name),
                prompt=text,
                response=s.text,
                at=_now_iso(),
                latency_s=round(s.finished - s.started, 6),
                completion_tokens=s.tokens,
            )
        )
        self.persist()
        if self.interactive:
            took = s.finished - s.started
            self.note(f"  ({s.tokens} tokens in {took:.2f} s, {s.tokens / max(took, 1e-9):.1f} tokens/s)")

    async def _stream(self, agent: AgentSpec, messages: list[dict[str, Any]], answer: _Answer) -> None:
        async for event in stream_chat(self._loop.client, agent, messages, timeout_s=self.settings.run.limits.timeout_s):
            if "delta" in event:
                answer.add(event["delta"])
            else:
                answer.usage = event.get("usage") or {}

    # ------------------------------------------------------------------ commands

    def cmd_help(self, arg: str) -> None:
        width = max(len(c.usage) for c in self.commands.values())
        for command in self.commands.values():
            self.say(f"{command.usage.ljust(width)}  {command.help}")
        self.say(f"{'//text'.ljust(width)}  send a message that starts with '/'")

    def cmd_quit(self, arg: str) -> bool:
        return False

    def cmd_stats(self, arg: str) -> None:
        if not self.requests:
            self.say("no requests yet in this session")
            return
        wall = time.time() - self.started
        s = summarize_requests(self.requests, self.agents, wall)
        chats = sum(1 for r in self.requests if r.kind == "chat")
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_type"].items()))
        self.say(f"session: {wall:.1f} s wall, {len(self.agents)} agents, {s['agent_slots']} agent slots")
        self.say(
            f"requests: {s['requests']} ({chats} chat, {s['requests'] - chats} batch), ok: {s['ok']}, "
            f"errors: {s['errors']}" + (f" ({errors})" if errors else "")
        )
        first = f", first token p50 {_s(s['first_token_p50_s'])}" if s["first_token_p50_s"] is not None else ""
        self.say(f"latency: p50 {_s(s['latency_p50_s'])}, p95 {_s(s['latency_p95_s'])}{first}")
        self.say(
            f"tokens: {s['completion_tokens']} generated, {_s(s['tokens_per_s'], ' tokens/s', 1)} "
            f"(over {s['busy_wall_s']:.2f} s with a request in flight)"
        )
        self.say(
            f"parallel efficiency: {_pct(s['parallel_efficiency'])} "
            f"({s['busy_agent_s']:.2f} busy agent-s / ({s['agent_slots']} slots x {wall:.2f} s))"
        )
        table = Table("agent", "requests", "errors", "busy s", "utilisation", box=None, pad_edge=False)
        for name, row in s["agents"].items():
            table.add_row(name, str(row["requests"]), str(row["errors"]), f"{row['busy_s']:.2f}", _pct(row["utilisation"]))
        self.console.print(table)

    def cmd_agent(self, arg: str) -> None:
        if not arg:
            self.pinned = None
            self.say(f"round-robin over {', '.join(self.by_name)}")
            return
        if arg not in self.by_name:
            close = difflib.get_close_matches(arg, list(self.by_name), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.problem(f"no agent {arg!r}{hint} (agents: {', '.join(self.by_name)})")
            return
        self.pinned = arg
        self.say(f"talking to {arg} (/agent alone returns to round-robin)")

    def cmd_agents(self, arg: str) -> None:
        health = self._loop.run(self._health())
        table = Table("agent", "model", "endpoint", "slots", "weight", "context", "requests", "health", box=None, pad_edge=False)
        for a in self.agents:
            n = sum(1 for r in self.requests if r.agent == a.name)
            table.add_row(
                a.name + (" *" if a.name == self.pinned else ""),
                a.model,
                _public_url(a.endpoint),
                str(a.concurrency),
                f"{a.weight:g}",
                f"{len(self.context(a.name)) // 2} turns",
                str(n),
                health[a.endpoint],
            )
        self.console.print(table)
        how = f"pinned to {self.pinned} (/agent returns to round-robin)" if self.pinned else "round-robin"
        batch = "in-process (--no-parsl)" if self.cfg.no_parsl else f"Parsl ({self.settings.profile.executor} profile)"
        self.say(f"routing: {how}; /batch runs {batch}, routing {self.settings.run.routing}")

    async def _health(self) -> dict[str, str]:
        endpoints = sorted({a.endpoint for a in self.agents})
        headers = {e: self._auth_headers(e) for e in endpoints}

        async def probe(endpoint: str) -> str:
            if not endpoint.startswith(("http://", "https://")):
                return "started per node by /batch"
            t0 = time.monotonic()
            try:
                resp = await self._loop.client.get(f"{endpoint}/models", headers=headers[endpoint], timeout=HEALTH_TIMEOUT_S)
            except httpx.TimeoutException:
                return f"down: no answer within {HEALTH_TIMEOUT_S:g} s"
            except httpx.HTTPError as exc:
                return f"down: {type(exc).__name__}"
            ms = (time.monotonic() - t0) * 1000
            if resp.status_code != 200:
                return f"HTTP {resp.status_code} ({ms:.0f} ms)"
            try:
                models = [m.get("id") for m in resp.json().get("data", [])]
            except (ValueError, AttributeError):
                models = []
            served = f", serves {', '.join(str(m) for m in models[:3])}" if models else ""
            return f"ok ({ms:.0f} ms{served})"

        results = await asyncio.gather(*(probe(e) for e in endpoints))
        return dict(zip(endpoints, results, strict=True))

    def _auth_headers(self, endpoint: str) -> dict[str, str]:
        for a in self.agents:
            if a.endpoint == endpoint and a.api_key is not None and a.api_key.reveal():
                return {"Authorization": f"Bearer {a.api_key.reveal()}"}
        return {}

    def cmd_history(self, arg: str) -> None:
        turns = self.turns
        if arg:
            if not arg.isdigit():
                self.problem("usage: /history [N]")
                return
            turns = turns[-int(arg) :] if int(arg) else []
        if not turns:
            self.say("no turns yet")
            return
        current = {self.conversation_id(a) for a in self.by_name}
        for t in turns:
            mark = "" if t.conversation in current else "  (before /reset)"
            self.say(f"#{t.n} you: {t.prompt}{mark}")
            self.say(f"   {t.agent}: {_one_line(t.response, 400)}")

    def cmd_reset(self, arg: str) -> None:
        names = [arg] if arg else list(self.by_name)
        if arg and arg not in self.by_name:
            self.problem(f"no agent {arg!r} (agents: {', '.join(self.by_name)})")
            return
        for name in names:
            self.epochs[name] = self.epochs.get(name, 1) + 1
        self.persist()
        who = arg or f"all {len(names)} agents"
        self.say(f"forgot the conversation of {who}; /history keeps the earlier turns")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.problem("usage: /save PATH")
            return
        path = Path(arg).expanduser()
        if not self.turns:
            self.problem("nothing to save yet")
            return
        lines = [
            json.dumps(
                {"id": f"{self.label}-{t.n}", "conversation": t.conversation, "agent": t.agent, "prompt": t.prompt},
                ensure_ascii=False,
            )
            for t in self.turns
        ]
        try:
            if path.parent != Path():
                path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, "\n".join(lines) + "\n")
        except OSError as exc:
            self.problem(f"cannot write {path}: {exc.strerror}")
            return
        convs = len({t.conversation for t in self.turns})
        self.say(f"saved {len(lines)} turn(s) in {convs} conversation(s) to {path}; replay with: parsl-chat run {path}")

    # ------------------------------------------------------------------ /batch

    def cmd_batch(self, arg: str) -> None:
        count_text, _, prompt = arg.partition(" ")
        if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_BATCH:
            self.problem(f"usage: /batch N [prompt]  (N from 1 to {MAX_BATCH})")
            return
        count, prompt = int(count_text), prompt.strip()
        backend = self._batch_backend()
        self.batches += 1
        texts = [prompt] * count if prompt else [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(count)]
        rows, wall = self._run_batch(backend, texts)
        for row in rows:
            self.requests.append(_row_stat(row))
        stats = [_row_stat(r) for r in rows]
        s = summarize_requests(stats, self.agents, wall)
        queue_p50, _ = _pcts([float(r["queue_s"]) for r in rows if r.get("queue_s") is not None])
        spread = ", ".join(f"{name} {a['requests']}" for name, a in s["agents"].items() if a["requests"])
        self.say(
            f"batch {self.batches}: {len(rows)} of {count} requests via {self._backend_label()}: "
            f"{s['ok']} ok, {s['errors']} failed in {wall:.2f} s ({spread})"
        )
        self.say(
            f"  throughput {s['requests_per_s']:.2f} req/s, {s['completion_tokens'] / max(wall, 1e-9):.1f} tokens/s; "
            f"latency p50 {_s(s['latency_p50_s'])}, p95 {_s(s['latency_p95_s'])}; queue p50 {_s(queue_p50)}; "
            f"parallel efficiency {_pct(s['parallel_efficiency'])} ({s['agent_slots']} agent slots)"
        )
        failed = [r for r in rows if r["status"] != "ok"]
        for row in failed[:3]:
            self.error(row.get("agent") or "?", row.get("error_type") or "other", row.get("error") or "")
        if len(failed) > 3:
            self.problem(f"... and {len(failed) - 3} more failed")

    def _backend_label(self) -> str:
        if self.cfg.no_parsl:
            return f"in-process backend ({self.settings.profile.workers} workers)"
        return f"Parsl ({self.settings.profile.executor}, {self._backend.workers if self._backend else '?'} workers)"

    def _batch_backend(self) -> Backend:
        if self._backend is None:
            if self.cfg.no_parsl:
                backend: Backend = InProcessBackend(self.settings.profile.workers)
            else:
                from .profiles import ParslBackend

                self.note(f"starting Parsl ({self.settings.profile.executor} profile) for /batch ...")
                backend = ParslBackend(self.settings.profile, self.run_id, self.cfg.runtime_dir / "parsl")
            backend.start()
            self._backend = backend
        return self._backend

    def _batch_agents(self) -> list[AgentSpec]:
        if self.cfg.batch_agents is None or self.cfg.no_parsl:
            return self.agents
        return self.cfg.batch_agents

    def _run_batch(self, backend: Backend, texts: list[str]) -> tuple[list[dict[str, Any]], float]:
        from .progress import RunProgress
        from .runner import chunk_size, slots_per_worker

        agents = self._batch_agents()
        router = Router(agents, self.settings.run.routing)
        items = []
        for i, text in enumerate(texts, 1):
            prompt = Prompt(custom_id=f"batch{self.batches}-{i}", line=i, messages=({"role": "user", "content": text},))
            record = prompt.to_dict()
            record["digest"] = prompt.digest
            items.append(WorkItem(prompts=[record], agent=router.assign(None)))
        slots = slots_per_worker(agents, backend.workers, self.cfg.no_parsl)
        size = chunk_size(agents, slots, backend.workers, len(items), self.settings.run.limits.chunk_size)
        stop_file = self.cfg.runtime_dir / ".stop"
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.unlink(missing_ok=True)
        started = time.time()
        for item in items:
            item.submitted_at = started
        futures: dict[Future[list[dict[str, Any]]], ChunkTask] = {}
        for cid, start in enumerate(range(0, len(items), size)):
            task = ChunkTask(
                run_id=self.run_id,
                chunk_id=cid,
                agents=agents,
                slots=slots,
                limits=self.settings.run.limits,
                items=items[start : start + size],
                stop_file=str(stop_file),
                node_server=self.cfg.node_server if not self.cfg.no_parsl else None,
                extra={"node_endpoint_placeholder": self.cfg.node_placeholder},
            )
            futures[backend.submit(task)] = task
        rows: list[dict[str, Any]] = []
        try:
            with RunProgress(len(items), console=self.err_console, quiet=not self.interactive) as progress:
                for future in as_completed(futures):
                    try:
                        got = future.result()
                    except Exception as exc:  # a worker died: its chunk's requests failed
                        got = _lost(futures[future], exc)
                    rows += got
                    failed = sum(1 for r in got if r["status"] != "ok")
                    progress.add(len(got) - failed, failed)
        except KeyboardInterrupt:
            stop_file.touch()
            for future in futures:
                future.cancel()
            self.problem(f"batch interrupted: {len(rows)} of {len(items)} requests finished")
        return rows, time.time() - started

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        backend, self._backend = self._backend, None
        try:
            if backend is not None:
                backend.shutdown()
        finally:
            self._loop.close()


def _ts(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value)).timestamp()


def _row_stat(row: dict[str, Any]) -> RequestStat:
    started = _ts(row.get("started_at"))
    finished = _ts(row.get("finished_at"))
    if started is None:
        started = finished = finished or _ts(row.get("submitted_at")) or time.time()
    return RequestStat(
        kind="batch",
        agent=str(row.get("agent") or "?"),
        status=str(row.get("status") or "error"),
        started=started,
        finished=finished if finished is not None else started,
        completion_tokens=int(row.get("completion_tokens") or 0),
        error_type=row.get("error_type"),
    )


def _lost(task: ChunkTask, exc: BaseException) -> list[dict[str, Any]]:
    now = iso(time.time())
    return [
        {
            "custom_id": p["custom_id"],
            "agent": task.agents[item.agent].name if item.agent is not None else None,
            "status": "error",
            "error_type": "other",
            "error": f"worker lost: {type(exc).__name__}: {exc}"[:300],
            "submitted_at": iso(item.submitted_at),
            "finished_at": now,
        }
        for item in task.items
        for p in item.prompts
    ]


# --------------------------------------------------------------------------- front ends


def _history_path(session: ChatSession) -> Path:
    if session.store is not None:
        return session.store.history_path
    return sessions_dir() / ".chat-history"


def run_repl(session: ChatSession) -> None:
    """The terminal front end: line editing, persistent history, completion of commands and agent names."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    class _Completer(Completer):
        def get_completions(self, document: Document, complete_event: Any) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/"):
                return
            if " " not in text:
                for name in session.commands:
                    if name.startswith(text[1:]):
                        yield Completion("/" + name, start_position=-len(text))
                return
            cmd, _, rest = text.partition(" ")
            if cmd in ("/agent", "/reset") and " " not in rest:
                for name in session.by_name:
                    if name.startswith(rest):
                        yield Completion(name, start_position=-len(rest))

    bindings = KeyBindings()

    @bindings.add("c-c")
    def _(event: KeyPressEvent) -> None:
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()  # Ctrl-C clears the line; twice on an empty line it leaves, as Ctrl-D does
        else:
            event.app.exit(exception=KeyboardInterrupt())

    history_path = _history_path(session)
    try:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history: Any = FileHistory(str(history_path))
    except OSError:
        history = InMemoryHistory()
    prompt: PromptSession[str] = PromptSession(
        history=history, key_bindings=bindings, completer=_Completer(), auto_suggest=AutoSuggestFromHistory()
    )
    session.note("type a message, or /help for the commands; Ctrl-D or /quit to leave")
    interrupted_at = 0.0
    while True:
        try:
            line = prompt.prompt(session.prompt_text())
        except EOFError:
            break
        except KeyboardInterrupt:  # on an empty line: a second one within 3 s leaves
            if time.monotonic() - interrupted_at < 3.0:
                break
            interrupted_at = time.monotonic()
            session.note("(Ctrl-C again, Ctrl-D or /quit to leave)")
            continue
        interrupted_at = 0.0
        try:
            if not session.handle(line):
                break
        except KeyboardInterrupt:
            session.problem("(interrupted)")


def run_piped(session: ChatSession, lines: Iterable[str]) -> None:
    """Standard input is not a terminal: answer each line in turn, plain output, stop at EOF or /quit."""
    for line in lines:
        if not session.handle(line.rstrip("\n")):
            break


# --------------------------------------------------------------------------- the command


@dataclass
class ChatOptions:
    profile: str | None = None
    config_file: str | None = None
    cli_settings: dict[str, Any] = field(default_factory=dict)
    no_parsl: bool = False
    session: str | None = None


def print_sessions(console: Console) -> None:
    found = list_sessions()
    if not found:
        console.print(f"no saved sessions in {sessions_dir()}", markup=False)
        return
    table = Table("session", "turns", "agents", "last used", "path", box=None, pad_edge=False)
    for s in found:
        table.add_row(s.name, str(s.turns) if s.turns >= 0 else "?", str(s.agents), s.updated_at, str(s.path))
    console.print(table)


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """SIGTERM / SIGHUP (terminal closed) end the chat through ``finally``, so servers and Parsl are stopped."""

    exiting: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if exiting:  # a shell re-sends SIGHUP to its jobs: don't break off the cleanup under way
            return
        exiting.append(signum)
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_chat(opts: ChatOptions, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """``parsl-chat chat``: resolve agents as ``run`` does, start what is needed, talk, clean up."""
    from .runner import NODE_LOCAL_ENDPOINT, endpoint_and_server

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    settings = load_settings(opts.profile or "local", opts.config_file, opts.cli_settings)
    endpoint, model, api_key, how = endpoint_and_server(settings, local_driver=True)
    from .agents import resolve_agents

    agents = resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key)
    interactive = stdin.isatty() and stdout.isatty()
    width = None if stdout.isatty() else 200
    console = Console(file=stdout, highlight=False, soft_wrap=True, width=width)
    err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
    store = SessionStore(opts.session) if opts.session else None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runtime_dir = data_dir() / "logs" / f"chat-{stamp}-{secrets.token_hex(3)}"
    server = None
    session: ChatSession | None = None
    with _exit_on_signals():
        if store is not None:
            store.acquire()
        try:
            node_server = None
            batch_agents = None
            if how == "driver":
                from .server import ModelServer

                server = ModelServer(settings.run.server, log_path=runtime_dir / "model-server.log")
                err_console.print(f"starting the embedded model server ({settings.run.server.model}) ...", style="dim")
                url = server.start()
                driver_agents = [replace(a, endpoint=url) if a.endpoint == NODE_LOCAL_ENDPOINT else a for a in agents]
                if settings.profile.executor != "local" and not opts.no_parsl:
                    node_server = settings.run.server  # /batch workers on other nodes start their own
                    batch_agents = agents
                agents = driver_agents
            cfg = ChatConfig(
                settings=settings,
                agents=agents,
                no_parsl=opts.no_parsl,
                runtime_dir=runtime_dir,
                batch_agents=batch_agents,
                node_server=node_server,
                node_placeholder=NODE_LOCAL_ENDPOINT if node_server is not None else None,
            )
            session = ChatSession(cfg, store=store, out=stdout, console=console, err_console=err_console, interactive=interactive)
            session.restore()
            if interactive:
                run_repl(session)
            else:
                run_piped(session, stdin)
        finally:
            try:
                if session is not None:
                    session.close()
            finally:
                if server is not None:
                    server.stop()
                if store is not None:
                    store.release()
                with contextlib.suppress(OSError):
                    runtime_dir.rmdir()  # only when nothing was logged there
