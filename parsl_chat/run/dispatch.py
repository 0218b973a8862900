"""The dispatch loop: chunks kept in flight, each chunk's rows recorded as it returns, lost chunks sent again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..backends import Backend
from ..errors import ServerError, ServerLost
from ..io.ledger import Ledger
from ..io.prompts import LineProblem
from ..io.rows import LedgerRow
from ..progress import RunProgress
from ..worker.executor import ChunkTask, WorkItem, iso, lost_rows, unfinished_rows
from .stopping import StopState

__all__ = ["CHUNK_MAX_BYTES", "CHUNK_RETRIES", "dispatch_chunks", "invalid_rows"]

log = logging.getLogger("parsl_chat.run")

CHUNK_RETRIES = 3
#: big prompts (documents, images) close a chunk early: a few chunks in flight stay within memory
CHUNK_MAX_BYTES = 64 << 20


def dispatch_chunks(
    *,
    backend: Backend,
    items: Iterator[WorkItem],
    make_task: Callable[[int, list[WorkItem]], ChunkTask],
    chunk_size: int,
    in_flight: int,
    ledger: Ledger,
    progress: RunProgress,
    stop: StopState,
    stop_file: Path,
    deadline: float | None,
    grace_s: float,
    on_tick: Callable[[], None],
    on_turn: Callable[[], None] | None = None,
) -> None:
    """Keep ``in_flight`` chunks submitted; record each chunk's rows as it returns.

    ``on_turn`` is called on every turn of the loop once chunks are out, before waiting for results.
    """
    chunks = _Chunks(backend, items, make_task, chunk_size, ledger, progress, stop)
    last_tick = 0.0
    grace_until: float | None = None
    while True:
        if deadline is not None and not stop and time.monotonic() >= deadline:
            stop.request("walltime")
        if stop and grace_until is None:
            grace_until = time.monotonic() + grace_s
            log.warning(
                "stopping (%s): no new chunks, waiting up to %.0f s for %d in flight", stop.reason, grace_s, len(chunks.pending)
            )
        chunks.fill(in_flight)
        if not chunks.pending:
            return
        if on_turn is not None:
            try:
                on_turn()
            except ServerLost as exc:  # the driver's model server died once too often
                stop.request(str(exc).partition("\n")[0], exc)
                continue
        timeout = 1.0 if grace_until is None else max(0.0, min(1.0, grace_until - time.monotonic()))
        done, _ = wait(list(chunks.pending), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            if not chunks.collect(future):
                return  # the ledger cannot be written: stop, keep what is recorded
        if time.monotonic() - last_tick > 2.0:
            last_tick = time.monotonic()
            on_tick()
        if grace_until is not None and (time.monotonic() >= grace_until or stop.hard):
            log.warning("grace period over: %d chunk(s) still in flight are left for the resume", len(chunks.pending))
            return


class _Chunks:
    """The chunks of one dispatch: cut from the work items, submitted, collected and recorded."""

    def __init__(
        self,
        backend: Backend,
        items: Iterator[WorkItem],
        make_task: Callable[[int, list[WorkItem]], ChunkTask],
        chunk_size: int,
        ledger: Ledger,
        progress: RunProgress,
        stop: StopState,
    ) -> None:
        self.backend, self.items, self.make_task, self.chunk_size = backend, items, make_task, chunk_size
        self.ledger, self.progress, self.stop = ledger, progress, stop
        self.pending: dict[Future[list[LedgerRow]], tuple[ChunkTask, int]] = {}  # -> (task, tries so far)
        self.next_id = 0
        self.exhausted = False
        # one item read ahead, so that the last chunk is known to be the last as it is sent
        self.upcoming = next(items, None)

    def submit(self, task: ChunkTask, tries: int) -> None:
        now = time.time()
        for item in task.items:
            item.submitted_at = item.submitted_at or now
        self.pending[self.backend.submit(task)] = (task, tries)

    def take_chunk(self) -> list[WorkItem]:
        batch: list[WorkItem] = []
        size = payload = 0
        while self.upcoming is not None and size < self.chunk_size and payload < CHUNK_MAX_BYTES:
            batch.append(self.upcoming)
            size += len(self.upcoming.prompts)
            payload += sum(p.get("line_bytes", 0) for p in self.upcoming.prompts)
            self.upcoming = next(self.items, None)
        return batch

    def fill(self, in_flight: int) -> None:
        """New chunks until ``in_flight`` are out, the items are all sent, or the run stops."""
        while not self.stop and not self.exhausted and len(self.pending) < in_flight:
            batch = self.take_chunk()
            if batch:
                self.submit(self.make_task(self.next_id, batch), 0)
                self.next_id += 1
            if self.upcoming is None:
                self.exhausted = True
                self.backend.all_submitted()  # the warm start's: Parsl may not be needed at all

    def collect(self, future: Future[list[LedgerRow]]) -> bool:
        """Record a returned chunk's rows (or send it again); False when the ledger cannot be written."""
        stop = self.stop
        task, tries = self.pending.pop(future)
        try:
            rows = future.result()
        except ServerLost as exc:  # a node's server cannot be restarted: stop, the resume sends the chunk
            stop.request(str(exc).partition("\n")[0], exc)
            return True
        except ServerError:
            raise  # a node's model server cannot start: retrying elsewhere would fail alike
        except Exception as exc:  # a worker or block died: the chunk's rows never arrived
            if tries + 1 < CHUNK_RETRIES and not stop:
                log.warning("chunk %d lost (%s: %s); sending it again", task.chunk_id, type(exc).__name__, exc)
                self.submit(task, tries + 1)
                return True
            if stop:
                return True  # not recorded, so a resume sends it again
            rows = lost_rows(task, f"worker lost {CHUNK_RETRIES} times: {type(exc).__name__}: {exc}")
        rows, cut_short = unfinished_rows(rows)
        _note_server_down(cut_short, stop)
        if not stop and len(rows) < sum(len(item.prompts) for item in task.items):
            # a drained chunk (warm start handing over to Parsl), or prompts given back: send them again
            done_ids = {row["custom_id"] for row in rows}
            rest = [item for item in task.items if not all(p["custom_id"] in done_ids for p in item.prompts)]
            if rest:
                self.submit(replace(task, items=rest), tries)
        return self.record(rows)

    def record(self, rows: list[LedgerRow]) -> bool:
        try:
            self.ledger.append(rows)
        except OSError as exc:  # disk full, quota, file size limit: stop, keep what is recorded
            self.stop.reason = f"cannot write {self.ledger.path}: {exc.strerror}"
            self.stop.hard = True
            return False
        self.backend.note_rows(rows)
        failed = sum(1 for r in rows if r["status"] != "ok")
        self.progress.add(len(rows) - failed, failed)
        return True


def _note_server_down(cut_short: list[LedgerRow], stop: StopState) -> None:
    """A model server that is gone (restarts used up, or never back): stop the run, to be resumed."""
    down = next((row for row in cut_short if row.get("error_type") == "server_down"), None)
    if down is not None:
        message = str(down.get("error") or "a model server is gone")
        first, _, rest = message.partition("\n")
        stop.request(first, ServerLost(first, rest.splitlines()))
    elif cut_short:
        log.info("%d prompt(s) cut short by the stop or the hand-over were given back", len(cut_short))


def invalid_rows(problems: list[LineProblem]) -> list[dict[str, Any]]:
    now = iso(time.time())
    return [
        {
            "custom_id": p.custom_id or f"line-{p.line}",
            "line": p.line,
            "agent": None,
            "status": "error",
            "error_type": "invalid_input",
            "error": p.message,
            "attempts": 0,
            "submitted_at": now,
        }
        for p in problems
    ]
