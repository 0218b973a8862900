"""Model servers parsl-chat runs, kept up during a run.

A server that dies mid-run (the out-of-memory killer, a segfault, kill -9) is not a
failure of the prompts it was answering. Two halves see to that:

* :class:`ServerWatch`, on the worker: after a connection failure to a server we run,
  it finds out whether the server is down, and waits for it to come back (the driver's
  own server, restarted by the driver) or restarts it (a node's server, through
  :func:`parsl_chat.serve.server.node_server`). A server that is back costs the prompt no
  attempt; one that is gone leaves the prompt unfinished, never failed.
* :class:`ServerSupervisor`, on the driver: checks its model server on every turn of
  the dispatch loop and restarts a dead one on the same port, ``server.max_restarts``
  times at most; then the run stops cleanly (exit 3), to be resumed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from ..core.agents import Recovery
from ..errors import ServerError, ServerLost
from .health import accepts_connections, past_loading
from .node import keep_crash_log
from .server import ModelServer

__all__ = ["ServerSupervisor", "ServerWatch"]

log = logging.getLogger("parsl_chat.serve.supervision")

_POLL_S = 0.25


class ServerWatch:
    """One model server as a chunk's requests see it.

    ``restart`` (a node's server) starts it again, blocking; it runs on ``starter``, a
    long-lived thread (a server dies with the thread that started it, see
    :func:`parsl_chat.serve.server._parent_death_hook`). Without ``restart`` (the driver's
    server) the watch waits up to ``wait_s`` for the driver to restart it.
    """

    def __init__(
        self,
        url: str,
        *,
        stopping: Callable[[], bool],
        restart: Callable[[], str] | None = None,
        starter: Executor | None = None,
        wait_s: float = 60.0,
    ) -> None:
        self.url = url
        self.stopping = stopping
        self.restart = restart
        self.starter = starter
        self.wait_s = wait_s
        #: why the server cannot be brought back (its prompts are given back, the run stops)
        self.gone: str | None = None

    def __repr__(self) -> str:
        return f"ServerWatch({self.url!r}, gone={self.gone is not None})"

    async def recover(self) -> Recovery:
        """After a connection failure: 'up' (not the server's fault), 'back' (it was down), or 'gone'."""
        if self.gone is not None:
            return "gone"
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, accepts_connections, self.url, 1.0):
            return "up"
        if self.restart is not None:
            try:
                await loop.run_in_executor(self.starter, self.restart)
            except ServerError as exc:
                self.gone = str(exc)
                return "gone"
            return "back"
        return await self._wait_for_driver(loop)

    async def _wait_for_driver(self, loop: asyncio.AbstractEventLoop) -> Recovery:
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            if self.stopping():
                return "gone"
            await asyncio.sleep(_POLL_S)
            # back = answering: a restarted llama-server accepts connections while it loads the model
            if await loop.run_in_executor(None, _answering, self.url):
                return "back"
        self.gone = f"the model server at {self.url} did not come back within {self.wait_s:g} s"
        return "gone"


def _answering(url: str) -> bool:
    return accepts_connections(url, 1.0) and past_loading(url, 1.0)


class ServerSupervisor:
    """The driver's model server, restarted on its port when it dies (``max_restarts`` times)."""

    def __init__(self, server: ModelServer, crash_dir: Path, max_restarts: int) -> None:
        self.server = server
        self.crash_dir = crash_dir
        self.max_restarts = max_restarts
        self.restarts = 0

    def __repr__(self) -> str:
        return f"ServerSupervisor({self.server!r}, restarts={self.restarts}/{self.max_restarts})"

    def check(self) -> None:
        """Restart the server if it died; ServerLost when it may not or cannot be restarted."""
        try:
            self.server.check()
            return
        except ServerError as death:
            self.restarts += 1
            first, _, tail = str(death).partition("\n")
            keep_crash_log(self.crash_dir, self.server.node, self.restarts, first, tail)
            log.warning("%s: restart %d of %d", first, self.restarts, self.max_restarts)
            if self.restarts > self.max_restarts:
                raise ServerLost(
                    f"{first.rstrip('.')}; it died {self.restarts} times in this run and is not restarted again",
                    tail.splitlines(),
                    hint=f"see the crash logs in {self.crash_dir}",
                ) from None
        try:
            self.server.restart()
        except ServerError as exc:
            first, _, tail = str(exc).partition("\n")
            raise ServerLost(f"the model server died and could not be restarted: {first}", tail.splitlines()) from None
        log.info("model server restarted at %s", self.server.url)
