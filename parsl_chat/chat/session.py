"""A chat session: its state (agents, conversations, request statistics), its output, and the dispatch of each line."""

from __future__ import annotations

import difflib
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import IO, Any, NamedTuple

import httpx
from rich.console import Console

from ..backends import Backend
from ..config import ServerConfig, Settings
from ..core.agents import AgentSpec, RequestFailure, stream_chat
from ..core.routing import Router
from ..io.sessions import SESSION_VERSION, SessionStore, Turn, data_dir
from . import commands
from ._text import http_message, now_iso, one_line, public_url
from .answer import Answer, RequestLoop
from .batch import cmd_batch
from .stats import RequestStat

__all__ = ["ChatConfig", "ChatSession", "Command"]


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
        self.created_at = now_iso()
        self.loop = RequestLoop()  # one event loop and HTTP client for every single-prompt turn
        self.batch_backend: Backend | None = None  # started by the first /batch, kept for the next
        self._secrets = [a.api_key.reveal() for a in self.agents if a.api_key is not None and a.api_key.reveal()]
        self.commands: dict[str, Command] = {
            "help": Command(partial(commands.cmd_help, self), "/help", "list the commands"),
            "stats": Command(
                partial(commands.cmd_stats, self),
                "/stats",
                "requests, errors, latency p50/p95, tokens/s, per-agent use, parallel efficiency",
            ),
            "batch": Command(
                partial(cmd_batch, self), "/batch N [prompt]", "send N requests in parallel across the agents (Parsl)"
            ),
            "agents": Command(partial(commands.cmd_agents, self), "/agents", "the fleet: models, endpoints, routing and health"),
            "agent": Command(
                partial(commands.cmd_agent, self), "/agent [NAME]", "talk to one agent; /agent alone returns to round-robin"
            ),
            "history": Command(partial(commands.cmd_history, self), "/history [N]", "the conversation so far (the last N turns)"),
            "reset": Command(
                partial(commands.cmd_reset, self), "/reset [NAME]", "forget the conversation (of every agent, or of NAME)"
            ),
            "save": Command(
                partial(commands.cmd_save, self), "/save PATH", "write the transcript as JSONL that 'parsl-chat run' replays"
            ),
            "quit": Command(partial(commands.cmd_quit, self), "/quit", "leave (also /exit, Ctrl-D); a --session is kept on disk"),
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
            f"error: {agent}: {error_type}: {one_line(self._scrub(message))}", style="red", markup=False, highlight=False
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
            "updated_at": now_iso(),
            "agents": [{**a.describe(), "endpoint": public_url(a.endpoint)} for a in self.agents],
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
        answer = Answer(self, agent.name)
        failure: tuple[str, str] | None = None
        try:
            self.loop.run(self._stream(agent, messages, answer))
        except RequestFailure as exc:
            failure = (exc.error_type, http_message(str(exc)))
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
                at=now_iso(),
                latency_s=round(s.finished - s.started, 6),
                completion_tokens=s.tokens,
            )
        )
        self.persist()
        if self.interactive:
            took = s.finished - s.started
            self.note(f"  ({s.tokens} tokens in {took:.2f} s, {s.tokens / max(took, 1e-9):.1f} tokens/s)")

    async def _stream(self, agent: AgentSpec, messages: list[dict[str, Any]], answer: Answer) -> None:
        async for event in stream_chat(self.loop.client, agent, messages, timeout_s=self.settings.run.limits.timeout_s):
            if "delta" in event:
                answer.add(event["delta"])
            else:
                answer.usage = event.get("usage") or {}

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        backend, self.batch_backend = self.batch_backend, None
        try:
            if backend is not None:
                backend.shutdown()
        finally:
            self.loop.close()
