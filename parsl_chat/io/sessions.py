"""Named chat sessions on disk (``parsl-chat chat --session NAME``).

A session lives in ``$XDG_DATA_HOME/parsl-chat/sessions/NAME.json`` (default
``~/.local/share/...``), rewritten atomically after every turn; its turns are
the conversations themselves, so restoring a session restores each agent's
context. A lock file keeps a session to one chat at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from .._files import atomic_write
from ..errors import ConfigError, UsageError

__all__ = ["SESSION_VERSION", "SessionInfo", "SessionStore", "Turn", "data_dir", "list_sessions", "sessions_dir"]

SESSION_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def data_dir() -> Path:
    """parsl-chat's per-user data: ``$XDG_DATA_HOME/parsl-chat`` (default ``~/.local/share/parsl-chat``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "parsl-chat"


def sessions_dir() -> Path:
    """Where named chat sessions are kept."""
    return data_dir() / "sessions"


@dataclass
class Turn:
    """One answered user message: the unit of conversation context and of the saved transcript."""

    n: int
    agent: str
    conversation: str
    prompt: str
    response: str
    at: str
    latency_s: float | None = None
    completion_tokens: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        return cls(
            n=int(data["n"]),
            agent=str(data["agent"]),
            conversation=str(data["conversation"]),
            prompt=str(data["prompt"]),
            response=str(data.get("response") or ""),
            at=str(data.get("at") or ""),
            latency_s=data.get("latency_s"),
            completion_tokens=data.get("completion_tokens"),
        )


class SessionInfo(NamedTuple):
    name: str
    turns: int
    agents: int
    updated_at: str
    path: Path


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid session name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 64 characters, starting with a letter or digit)",
        )
    return name


class SessionStore:
    """One named session on disk, rewritten atomically after each turn; a lock file keeps it to one chat at a time."""

    def __init__(self, name: str, folder: Path | None = None) -> None:
        self.name = _check_name(name)
        self.folder = folder or sessions_dir()
        self.path = self.folder / f"{name}.json"
        self.history_path = self.folder / f"{name}.history"
        self._lock: IO[str] | None = None

    def __repr__(self) -> str:
        return f"SessionStore({self.name!r}, path={str(self.path)!r})"

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / f".{self.name}.lock", "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        except OSError as exc:
            raise ConfigError(f"{self.folder}: cannot create the sessions folder: {exc.strerror}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise UsageError(
                f"session {self.name!r} is open in another parsl-chat chat (pid {holder})",
                hint="leave that chat first, or choose another --session",
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the session: {exc.strerror}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("turns", []), list):
                raise ValueError("not a session object")
            [Turn.from_dict(t) for t in data.get("turns", [])]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.path}: the session file is damaged ({exc})",
                hint="move it away to start the session afresh, or choose another --session",
            ) from None
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def list_sessions(folder: Path | None = None) -> list[SessionInfo]:
    """Saved sessions, most recently updated first; a file that cannot be read is listed as damaged."""
    folder = folder or sessions_dir()
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            turns = data.get("turns", [])
            agents = len({t.get("agent") for t in turns})
            out.append(SessionInfo(path.stem, len(turns), agents, str(data.get("updated_at") or "?"), path))
        except (OSError, ValueError, AttributeError):
            out.append(SessionInfo(path.stem, -1, 0, "damaged", path))
    return sorted(out, key=lambda s: s.updated_at, reverse=True)
