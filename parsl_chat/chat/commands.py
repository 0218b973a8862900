"""The /commands other than /batch, as methods :class:`~.session.ChatSession` inherits."""

from __future__ import annotations

import asyncio
import difflib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from rich.table import Table

from .._files import atomic_write
from ._text import one_line, public_url
from .stats import fmt_pct, fmt_s, summarize_requests

if TYPE_CHECKING:
    from .session import ChatSession

__all__ = ["cmd_agent", "cmd_agents", "cmd_help", "cmd_history", "cmd_quit", "cmd_reset", "cmd_save", "cmd_stats"]

HEALTH_TIMEOUT_S = 2.0


def cmd_help(session: ChatSession, arg: str) -> None:
    width = max(len(c.usage) for c in session.commands.values())
    for command in session.commands.values():
        session.say(f"{command.usage.ljust(width)}  {command.help}")
    session.say(f"{'//text'.ljust(width)}  send a message that starts with '/'")


def cmd_quit(session: ChatSession, arg: str) -> bool:
    return False


def cmd_stats(session: ChatSession, arg: str) -> None:
    if not session.requests:
        session.say("no requests yet in this session")
        return
    wall = time.time() - session.started
    s = summarize_requests(session.requests, session.agents, wall)
    chats = sum(1 for r in session.requests if r.kind == "chat")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_type"].items()))
    session.say(f"session: {wall:.1f} s wall, {len(session.agents)} agents, {s['agent_slots']} agent slots")
    session.say(
        f"requests: {s['requests']} ({chats} chat, {s['requests'] - chats} batch), ok: {s['ok']}, "
        f"errors: {s['errors']}" + (f" ({errors})" if errors else "")
    )
    first = f", first token p50 {fmt_s(s['first_token_p50_s'])}" if s["first_token_p50_s"] is not None else ""
    session.say(f"latency: p50 {fmt_s(s['latency_p50_s'])}, p95 {fmt_s(s['latency_p95_s'])}{first}")
    session.say(
        f"tokens: {s['completion_tokens']} generated, {fmt_s(s['tokens_per_s'], ' tokens/s', 1)} "
        f"(over {s['busy_wall_s']:.2f} s with a request in flight)"
    )
    session.say(
        f"parallel efficiency: {fmt_pct(s['parallel_efficiency'])} "
        f"({s['busy_agent_s']:.2f} busy agent-s / ({s['agent_slots']} slots x {wall:.2f} s))"
    )
    table = Table("agent", "requests", "errors", "busy s", "utilisation", box=None, pad_edge=False)
    for name, row in s["agents"].items():
        table.add_row(name, str(row["requests"]), str(row["errors"]), f"{row['busy_s']:.2f}", fmt_pct(row["utilisation"]))
    session.console.print(table)


def cmd_agent(session: ChatSession, arg: str) -> None:
    if not arg:
        session.pinned = None
        session.say(f"round-robin over {', '.join(session.by_name)}")
        return
    if arg not in session.by_name:
        close = difflib.get_close_matches(arg, list(session.by_name), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        session.problem(f"no agent {arg!r}{hint} (agents: {', '.join(session.by_name)})")
        return
    session.pinned = arg
    session.say(f"talking to {arg} (/agent alone returns to round-robin)")


def cmd_agents(session: ChatSession, arg: str) -> None:
    health = session.loop.run(_health(session))
    table = Table("agent", "model", "endpoint", "slots", "weight", "context", "requests", "health", box=None, pad_edge=False)
    for a in session.agents:
        n = sum(1 for r in session.requests if r.agent == a.name)
        table.add_row(
            a.name + (" *" if a.name == session.pinned else ""),
            a.model,
            public_url(a.endpoint),
            str(a.concurrency),
            f"{a.weight:g}",
            f"{len(session.context(a.name)) // 2} turns",
            str(n),
            health[a.endpoint],
        )
    session.console.print(table)
    how = f"pinned to {session.pinned} (/agent returns to round-robin)" if session.pinned else "round-robin"
    batch = "in-process (--no-parsl)" if session.cfg.no_parsl else f"Parsl ({session.settings.profile.executor} profile)"
    session.say(f"routing: {how}; /batch runs {batch}, routing {session.settings.run.routing}")


async def _health(session: ChatSession) -> dict[str, str]:
    endpoints = sorted({a.endpoint for a in session.agents})
    headers = {e: _auth_headers(session, e) for e in endpoints}

    async def probe(endpoint: str) -> str:
        if not endpoint.startswith(("http://", "https://")):
            return "started per node by /batch"
        t0 = time.monotonic()
        try:
            resp = await session.loop.client.get(f"{endpoint}/models", headers=headers[endpoint], timeout=HEALTH_TIMEOUT_S)
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


def _auth_headers(session: ChatSession, endpoint: str) -> dict[str, str]:
    for a in session.agents:
        if a.endpoint == endpoint and a.api_key is not None and a.api_key.reveal():
            return {"Authorization": f"Bearer {a.api_key.reveal()}"}
    return {}


def cmd_history(session: ChatSession, arg: str) -> None:
    turns = session.turns
    if arg:
        if not arg.isdigit():
            session.problem("usage: /history [N]")
            return
        turns = turns[-int(arg) :] if int(arg) else []
    if not turns:
        session.say("no turns yet")
        return
    current = {session.conversation_id(a) for a in session.by_name}
    for t in turns:
        mark = "" if t.conversation in current else "  (before /reset)"
        session.say(f"#{t.n} you: {t.prompt}{mark}")
        session.say(f"   {t.agent}: {one_line(t.response, 400)}")


def cmd_reset(session: ChatSession, arg: str) -> None:
    names = [arg] if arg else list(session.by_name)
    if arg and arg not in session.by_name:
        session.problem(f"no agent {arg!r} (agents: {', '.join(session.by_name)})")
        return
    for name in names:
        session.epochs[name] = session.epochs.get(name, 1) + 1
    session.persist()
    who = arg or f"all {len(names)} agents"
    session.say(f"forgot the conversation of {who}; /history keeps the earlier turns")


def cmd_save(session: ChatSession, arg: str) -> None:
    if not arg:
        session.problem("usage: /save PATH")
        return
    path = Path(arg).expanduser()
    if not session.turns:
        session.problem("nothing to save yet")
        return
    lines = [
        json.dumps(
            {"id": f"{session.label}-{t.n}", "conversation": t.conversation, "agent": t.agent, "prompt": t.prompt},
            ensure_ascii=False,
        )
        for t in session.turns
    ]
    try:
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "\n".join(lines) + "\n")
    except OSError as exc:
        session.problem(f"cannot write {path}: {exc.strerror}")
        return
    convs = len({t.conversation for t in session.turns})
    session.say(f"saved {len(lines)} turn(s) in {convs} conversation(s) to {path}; replay with: parsl-chat run {path}")
