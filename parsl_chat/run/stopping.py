"""Stopping a run cleanly: the stop flag, signals, a hung-up terminal, the SLURM walltime."""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .._signals import install_handlers
from ..backends.targets.slurm import slurm_time_left_s
from ..errors import ParslChatError

__all__ = ["StopState", "install_signals", "walltime_deadline"]

log = logging.getLogger("parsl_chat.run")


class StopState:
    """Set by signals, the walltime watch and a model server that is gone; read by the dispatch loop.

    Requesting a stop also creates ``stop_file``, which workers read: they start nothing
    new and retry nothing, and hand back what they have not finished.
    """

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.also_touch: list[Path] = []  # other files chunks read as their stop file (a warm start's drain file)
        self.reason: str | None = None
        self.error: ParslChatError | None = None  # a stop that is a failure (a model server lost), said at the end
        self.hard = False

    def __bool__(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, error: ParslChatError | None = None) -> None:
        if self.reason is None:
            self.reason, self.error = reason, error
        for path in (self.stop_file, *self.also_touch):
            try:
                path.touch()
            except OSError:
                pass


def walltime_deadline() -> float | None:
    """Monotonic time by which dispatch must stop to exit cleanly inside a SLURM job."""
    left = slurm_time_left_s()
    if left is None:
        return None
    given = os.environ.get("PARSL_CHAT_WALLTIME_MARGIN_S")
    # default: stop 5 % before the end, at least 30 s, but never in the first half of the job
    margin = float(given) if given else min(max(30.0, 0.05 * left), 0.5 * left)
    log.info(
        "inside SLURM job %s: %.0f s left, stopping dispatch %.0f s before the end", os.environ.get("SLURM_JOB_ID"), left, margin
    )
    return time.monotonic() + left - margin


def install_signals(stop: StopState) -> dict[int, Any]:
    """The run's handlers: a stop on the first signal, at once on a second Ctrl-C; returns the previous ones."""

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop and signum == signal.SIGINT:
            stop.hard = True  # a second Ctrl-C: stop now (the ledger is flushed per chunk)
            raise KeyboardInterrupt
        stop.request(name)
        if signum == signal.SIGHUP:
            _detach_from_terminal()
            return
        print(
            f"\nparsl-chat: {name} received: finishing requests in flight, then stopping (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    # SIGHUP: the terminal went away (an SSH session dropped). By default it killed the driver at
    # once, leaving run.json 'running' and the interchange (in its own session) behind.
    return install_handlers((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP), handler)


def _detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null where they were a terminal that has hung up.

    Writes to a hung-up terminal fail (EIO), and the progress display, the end-of-run
    message and the error path all write; the run itself goes on to a clean stop.
    Files and pipes (a batch job's output) are kept.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (isatty() fails on one that hung up)
                    os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)
