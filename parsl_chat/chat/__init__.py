"""``parsl-chat chat``: an interactive session with the same agents ``run`` uses.

:class:`ChatSession` (session.py) holds the state (per-agent conversations,
request statistics, the lazily started batch backend) and dispatches every
``/command`` from one table to methods it inherits from commands.py and batch.py;
stats.py computes /stats, answer.py streams one answer. :func:`run_repl`
(repl.py) drives it from a terminal (prompt_toolkit: line editing, history,
completion); :func:`run_piped` from standard input when that is not a terminal.
:func:`run_chat` (main.py) resolves the settings exactly as ``run`` does, starts
the embedded model server when no endpoint is configured, and stops everything
on the way out.

Named sessions (``--session NAME``) are kept on disk by :mod:`parsl_chat.io.sessions`;
restoring one restores each agent's context.
"""

from __future__ import annotations

from .main import ChatOptions, print_sessions, run_chat
from .repl import run_piped, run_repl
from .session import ChatConfig, ChatSession
from .stats import RequestStat, summarize_requests

__all__ = [
    "ChatConfig",
    "ChatOptions",
    "ChatSession",
    "RequestStat",
    "print_sessions",
    "run_chat",
    "run_piped",
    "run_repl",
    "summarize_requests",
]
