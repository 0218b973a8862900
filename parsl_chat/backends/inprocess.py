"""``--no-parsl``: the same chunks, run by a thread pool in the driver's process."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..io.rows import LedgerRow
from ..worker.executor import ChunkTask, close_client, iso, run_chunk, where_am_i

__all__ = ["InProcessBackend"]


class InProcessBackend:
    """``--no-parsl``: the same chunks, run by a thread pool in this process."""

    label = "in-process"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._started = time.time()
        self._ended: float | None = None

    def __repr__(self) -> str:
        return f"InProcessBackend(workers={self.workers})"

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="parsl-chat-worker")

    def submit(self, task: ChunkTask) -> Future[list[LedgerRow]]:
        assert self._pool is not None, "start() first"
        return self._pool.submit(run_chunk, task)

    def all_submitted(self) -> None:
        pass  # the pool has nothing to start or stop early

    def note_rows(self, rows: list[LedgerRow]) -> None:
        pass  # one "block": this process, on this node

    def processes(self) -> list[dict[str, Any]]:
        return []  # threads of this process: nothing outlives it

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            close_client()
            self._ended = time.time()

    def blocks(self) -> list[dict[str, Any]]:
        place = where_am_i()
        return [
            {
                "block": None,
                "job_id": None,
                "submitted_at": iso(self._started),
                "ended_at": iso(self._ended),
                "nodes": [place["node"]],
            }
        ]
