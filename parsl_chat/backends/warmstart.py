"""A warm start: Parsl on this machine, the first chunks answered in this process while it starts."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.rows import LedgerRow
from ..worker.executor import ChunkTask
from .inprocess import InProcessBackend

if TYPE_CHECKING:
    from .parsl import ParslBackend

__all__ = ["WarmStartBackend"]

log = logging.getLogger("parsl_chat.run")  # the name the run's log has always shown


class WarmStartBackend:
    """Parsl on this machine, with the first chunks run in this process while Parsl starts.

    HTEX needs seconds before a worker runs anything (interchange, worker pool and worker
    imports). Until a warm-up task has come back from a worker, chunks run in-process with
    each agent's whole concurrency; then those chunks are drained (a file their slots check:
    no new request, requests in flight finish), their unstarted items are sent again to Parsl
    by the dispatcher, and only once the in-process requests are over do chunks go to Parsl,
    so an agent's concurrency limit holds throughout. A run that ends before the hand-over
    stops Parsl as soon as Parsl's own start is over, without waiting for its workers; so
    does one whose every chunk was sent before the hand-over (:meth:`all_submitted`).
    """

    def __init__(self, parsl: ParslBackend, threads: int, drain_file: Path) -> None:
        self.parsl = parsl
        self.label = parsl.label
        self.workers = parsl.workers
        self.local = InProcessBackend(threads)
        self.drain_file = drain_file
        self._ready = threading.Event()  # Parsl's workers can take over (or Parsl failed, or the run ended)
        self._wake = threading.Event()  # a warm-up task came back, or the run is ending
        self._error: BaseException | None = None
        self._local: set[Future[list[LedgerRow]]] = set()
        self._handed_over = False
        self._parsl_stopping: Future[None] | None = None  # set once every chunk stays in this process
        self.handover_s: float | None = None

    def __repr__(self) -> str:
        return f"WarmStartBackend({self.parsl!r})"

    def blocks(self) -> list[dict[str, Any]]:
        """The driver's own share (the in-process chunks ran there), then Parsl's blocks."""
        return self.local.blocks() + self.parsl.blocks()

    def processes(self) -> list[dict[str, Any]]:
        return self.parsl.processes()  # the in-process pool has none

    def note_rows(self, rows: list[LedgerRow]) -> None:
        self.parsl.note_rows(rows)

    def start(self) -> None:
        self.drain_file.unlink(missing_ok=True)
        self.local.start()
        started = time.monotonic()

        def boot() -> None:
            try:
                self.parsl.start()
                if not self._wake.is_set():
                    for future in self.parsl.warm_up():
                        future.add_done_callback(lambda _: self._wake.set())
                    self._wake.wait()
            except BaseException as exc:  # reported by the next submit()
                self._error = exc
            self.handover_s = time.monotonic() - started
            self._ready.set()

        threading.Thread(target=boot, name="parsl-chat-warm-start", daemon=True).start()

    def submit(self, task: ChunkTask) -> Future[list[LedgerRow]]:
        if not self._ready.is_set() or self._parsl_stopping is not None:
            local = replace(task, slots=[a.concurrency for a in task.agents], stop_file=str(self.drain_file))
            future = self.local.submit(local)
            self._local.add(future)
            future.add_done_callback(self._local.discard)
            return future
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if not self._handed_over:
            self.drain_file.touch()
            wait(list(self._local))  # requests in flight here end before Parsl's workers start theirs
            self._handed_over = True
            log.info("warm start: Parsl workers took over after %.1f s", self.handover_s or 0.0)
        return self.parsl.submit(task)

    def all_submitted(self) -> None:
        """The dispatcher has nothing more to send (a chunk sent again still comes here).

        Before the hand-over every chunk is in this process already, and Parsl's workers
        would start (imports in four processes: seconds of CPU that a model server on
        the same cores needs) only to be stopped at the end: stop Parsl now, in the background.
        """
        if self._handed_over or self._parsl_stopping is not None:
            return
        log.info("warm start: every chunk runs in this process; stopping Parsl's start")
        self._wake.set()  # no waiting for a warm-up task
        stopping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parsl-chat-parsl-stop")
        self._parsl_stopping = stopping.submit(self._stop_parsl)
        stopping.shutdown(wait=False)

    def _stop_parsl(self) -> None:
        # no waiting for Parsl's workers to come up (seconds), only for Parsl's own start,
        # so that its cleanup finds all it started: never leave a half-started Parsl behind
        self._ready.wait(timeout=60)
        self.parsl.shutdown()  # cancels the block being started (worker pool) and ends the interchange

    def shutdown(self) -> None:
        self.drain_file.touch()
        self.local.shutdown()
        if self._parsl_stopping is not None:
            self._parsl_stopping.result()
        else:
            if not self._handed_over:
                log.info("warm start: the run ended before Parsl's workers took over; stopping Parsl")
                self._wake.set()
            self._stop_parsl()
        self.drain_file.unlink(missing_ok=True)
