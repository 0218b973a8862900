"""The end of a run: results files, failure count, summary, run.json's blocks, and the imports they need, preloaded."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..backends import Backend
from ..errors import RunInterrupted
from ..io.ledger import Ledger
from ..io.rundir import write_run_meta
from ..serve.supervision import ServerSupervisor
from .stopping import StopState

__all__ = [
    "END_MODULES",
    "Preload",
    "cannot_write",
    "close_ledger",
    "every_turn",
    "failed_count",
    "update_run_blocks",
    "write_results",
    "write_run_summary",
]

log = logging.getLogger("parsl_chat.run")

#: What the end of a run imports (results files, failure count, summary): 0.4-0.5 s the first
#: time, most of it pandas (through pyarrow.dataset and analysis). Loaded while requests run.
END_MODULES = ("parsl_chat.io.results", "pyarrow.compute", "pyarrow.dataset", "pandas", "parsl_chat.analysis")


def every_turn(preload: Preload, supervisor: ServerSupervisor | None) -> None:
    """Every turn of the dispatch loop: the driver's model server kept up, the end's imports started when idle."""
    if supervisor is not None:
        supervisor.check()
    preload.start_if_idle()


def write_results(run_dir: Path) -> int:
    """:func:`parsl_chat.io.results.write_results`, imported when first needed: pyarrow stays off the start of a run."""
    from ..io.results import write_results as write

    return write(run_dir)


class Preload:
    """Imports modules in a daemon thread, while the driver has CPU to spare: what the end of the run needs.

    The driver is mostly idle while requests run (Parsl's workers, or in-process requests waiting
    on the endpoint), and then the imports come free. Where it is busy (in-process requests to a
    fast endpoint) they would only slow the requests, by more than they save at the end (measured:
    +0.38 s wall, +0.16 s CPU on 2,000 prompts at 0 ms), so the end pays for them as before.
    """

    IDLE_SHARE = 0.25  #: of one core, over WINDOW_S at least
    WINDOW_S = 0.5

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._thread: threading.Thread | None = None
        self._since: tuple[float, float] | None = None  # (wall, this process's CPU) when measuring began

    def start_if_idle(self) -> None:
        """Called as dispatch turns: starts the imports once the driver used under IDLE_SHARE of a core."""
        if self._thread is not None:
            return
        now = (time.monotonic(), time.process_time())
        if self._since is None or now[0] - self._since[0] < self.WINDOW_S:
            self._since = self._since or now
            return
        busy = (now[1] - self._since[1]) / (now[0] - self._since[0])
        self._since = now
        if busy < self.IDLE_SHARE:
            self._thread = threading.Thread(target=self._load, name="parsl-chat-preload", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception:  # imported again where it is needed, and reported there
                log.debug("preloading %s failed", name, exc_info=True)

    def wait(self) -> None:
        """Call before importing any of the modules: two threads importing pandas and pyarrow at once can
        meet in their circular imports (pandas imports pyarrow, pyarrow.dataset imports pandas)."""
        if self._thread is not None:
            self._thread.join()


def close_ledger(ledger: Ledger) -> None:
    try:
        ledger.close()
    except OSError:
        pass  # the failed write is reported by the results; complete lines are already on disk


def cannot_write(run_dir: Path, exc: OSError, stop: StopState) -> RunInterrupted:
    return RunInterrupted(
        f"cannot write the results in {run_dir}: {exc.strerror} ({stop.reason or 'after the last prompt'}); "
        "every answer recorded so far is in ledger.jsonl",
        hint=f"free space (or raise the quota), then finish with: parsl-chat run --resume {run_dir}",
    )


def failed_count(run_dir: Path) -> int:
    """Rows not ok in results.parquet, read from its one 'status' column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(run_dir / "results.parquet", columns=["status"])["status"]
    return len(status) - int(pc.sum(pc.equal(status, "ok")).as_py() or 0)


def write_run_summary(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from ..report import write_summary

    write_run_meta(run_dir, meta)
    summary: dict[str, Any] = json.loads(write_summary(run_dir).read_text(encoding="utf-8"))
    return summary


def update_run_blocks(meta: dict[str, Any], earlier: list[dict[str, Any]], backend: Backend | None, run_dir: Path) -> None:
    """Keep run.json's block list current: a later ``cleanup`` needs the job ids after a crash."""
    if backend is None:
        return
    blocks = earlier + backend.blocks()
    processes = backend.processes()
    if blocks != meta["blocks"] or processes != meta.get("processes"):
        meta["blocks"] = blocks
        meta["processes"] = processes
        write_run_meta(run_dir, meta)
