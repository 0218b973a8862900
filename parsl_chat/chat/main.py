"""``parsl-chat chat``: resolve the agents as ``run`` does, start what is needed, talk, clean up."""

from __future__ import annotations

import contextlib
import secrets
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .._signals import handling
from ..backends.targets import model_servers, target_for
from ..config import Settings, load_settings
from ..core.agents import AgentSpec, resolve_agents
from ..io.sessions import SessionStore, data_dir, list_sessions, sessions_dir
from .repl import run_piped, run_repl
from .session import ChatConfig, ChatSession

if TYPE_CHECKING:
    from ..serve.server import ModelServer

__all__ = ["ChatOptions", "print_sessions", "run_chat"]


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

    with handling((signal.SIGTERM, signal.SIGHUP), handler):
        yield


def _consoles(stdout: IO[str]) -> tuple[Console, Console]:
    """The answer console and the status console; 200 columns when not a terminal, so piped lines do not wrap."""
    console = Console(file=stdout, highlight=False, soft_wrap=True, width=None if stdout.isatty() else 200)
    err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
    return console, err_console


def _start_server(server: ModelServer, err_console: Console) -> str:
    err_console.print(f"starting the embedded model server ({server.cfg.model}) ...", style="dim")
    url = server.start()
    if server.notice:  # not llama-server: one line saying why
        err_console.print(server.notice, markup=False, highlight=False)
    return url


def _driver_config(settings: Settings, agents: list[AgentSpec], url: str, no_parsl: bool) -> dict[str, Any]:
    """The ChatConfig fields when the embedded server runs here: chat on ``url``; /batch workers elsewhere start their own."""
    from ..run import NODE_LOCAL_ENDPOINT

    driver_agents = [replace(a, endpoint=url) if a.endpoint == NODE_LOCAL_ENDPOINT else a for a in agents]
    if target_for(settings.profile).workers_on_driver or no_parsl:
        return {"agents": driver_agents}
    return {
        "agents": driver_agents,
        "batch_agents": agents,
        "node_server": settings.run.server,
        "node_placeholder": NODE_LOCAL_ENDPOINT,
    }


def _talk(session: ChatSession, stdin: IO[str]) -> None:
    session.restore()
    if session.interactive:
        run_repl(session)
    else:
        run_piped(session, stdin)


def run_chat(opts: ChatOptions, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """``parsl-chat chat``: resolve agents as ``run`` does, start what is needed, talk, clean up."""
    from ..run import NODE_LOCAL_ENDPOINT, endpoint_and_server

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    settings = load_settings(opts.profile or "local", opts.config_file, opts.cli_settings)
    endpoint, model, api_key, how = endpoint_and_server(settings, local_driver=True)
    agents = resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key, model_servers(settings.profile))
    console, err_console = _consoles(stdout)
    store = SessionStore(opts.session) if opts.session else None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runtime_dir = data_dir() / "logs" / f"chat-{stamp}-{secrets.token_hex(3)}"
    server = None
    session: ChatSession | None = None
    with _exit_on_signals():
        if store is not None:
            store.acquire()
        try:
            fields: dict[str, Any] = {"agents": agents}
            if how == "driver":
                from ..serve.server import ModelServer

                server = ModelServer(settings.run.server, log_path=runtime_dir / "model-server.log")
                fields = _driver_config(settings, agents, _start_server(server, err_console), opts.no_parsl)
            cfg = ChatConfig(settings=settings, no_parsl=opts.no_parsl, runtime_dir=runtime_dir, **fields)
            interactive = stdin.isatty() and stdout.isatty()
            session = ChatSession(cfg, store=store, out=stdout, console=console, err_console=err_console, interactive=interactive)
            _talk(session, stdin)
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
