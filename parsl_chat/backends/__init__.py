"""Where chunks run: the :class:`Backend` interface and its implementations.

- :mod:`.inprocess`: ``--no-parsl``, a thread pool in the driver's process;
- :mod:`.parsl`: a Parsl HighThroughputExecutor built from the profile (local, SLURM, Kubernetes);
- :mod:`.warmstart`: Parsl on this machine, the first chunks answered in-process while it starts.
- :mod:`.targets`: where Parsl's blocks run (local, slurm, slurm-allocation, kubernetes), one module
  per target behind one registry; the Parsl backend asks the profile's target for its provider.

Backends use the core modules (executor's ChunkTask and run_chunk, config, errors, profiles),
never the run, the CLI, the chat or the report. This module imports no backend: each is
imported where it is chosen, so that what one needs (Parsl, psutil) loads only then.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

from ..io.rows import LedgerRow
from ..worker.executor import ChunkTask

__all__ = ["Backend"]


class Backend(Protocol):
    """Where chunks run: everything the dispatcher, the run and the chat ask of a backend.

    Every backend hands back concurrent.futures.Future objects and implements every method
    (a no-op where it has nothing to do): callers never probe for one.
    """

    label: str
    workers: int

    def start(self) -> None:
        """Bring the workers up (a warm start: in the background); before the first submit."""

    def submit(self, task: ChunkTask) -> Future[list[LedgerRow]]:
        """Run one chunk; the future's result is the chunk's rows."""

    def all_submitted(self) -> None:
        """The dispatcher has nothing more to send (a chunk sent again may still follow)."""

    def note_rows(self, rows: list[LedgerRow]) -> None:
        """Rows of a chunk that came back, as recorded (where they ran: the blocks' nodes)."""

    def blocks(self) -> list[dict[str, Any]]:
        """Blocks started so far, as run.json keeps them (job ids for a later cleanup)."""

    def processes(self) -> list[dict[str, Any]]:
        """Local processes a SIGKILLed driver would orphan, as run.json keeps them."""

    def shutdown(self) -> None:
        """Stop the workers and what they run on; safe to call more than once."""
