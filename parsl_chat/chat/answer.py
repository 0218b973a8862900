"""Streaming one answer: the private event loop requests run on, and the answer as it reaches the screen."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

if TYPE_CHECKING:
    from .session import ChatSession

__all__ = ["Answer", "RequestLoop"]

T = TypeVar("T")


class RequestLoop:
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


class Answer:
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
