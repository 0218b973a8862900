"""The front ends that feed a session lines: the terminal (prompt_toolkit) and a pipe."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.sessions import sessions_dir
from .session import ChatSession

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

__all__ = ["run_piped", "run_repl"]


def _history_path(session: ChatSession) -> Path:
    if session.store is not None:
        return session.store.history_path
    return sessions_dir() / ".chat-history"


def _completions(session: ChatSession, text: str) -> Iterator[tuple[str, int]]:
    """(completion, start position) for a line: command names after '/', agent names after /agent and /reset."""
    if not text.startswith("/"):
        return
    if " " not in text:
        for name in session.commands:
            if name.startswith(text[1:]):
                yield "/" + name, -len(text)
        return
    cmd, _, rest = text.partition(" ")
    if cmd in ("/agent", "/reset") and " " not in rest:
        for name in session.by_name:
            if name.startswith(rest):
                yield name, -len(rest)


def _prompt_session(session: ChatSession) -> PromptSession[str]:
    """A prompt_toolkit prompt with the session's history file, completion, and Ctrl-C that clears the line."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    class _Completer(Completer):
        def get_completions(self, document: Document, complete_event: Any) -> Iterator[Completion]:
            for text, start in _completions(session, document.text_before_cursor):
                yield Completion(text, start_position=start)

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
    return PromptSession(history=history, key_bindings=bindings, completer=_Completer(), auto_suggest=AutoSuggestFromHistory())


def run_repl(session: ChatSession) -> None:
    """The terminal front end: line editing, persistent history, completion of commands and agent names."""
    prompt = _prompt_session(session)
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
