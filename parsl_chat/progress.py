"""Progress: a live bar on a terminal, plain periodic log lines in batch jobs."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

__all__ = ["RunProgress"]

log = logging.getLogger("parsl_chat.progress")


class RunProgress:
    """Counts done / failed prompts and shows rate and ETA."""

    LOG_EVERY_S = 10.0

    def __init__(self, total: int, *, console: Console, quiet: bool = False, interactive: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.console = console
        self.quiet = quiet
        self.interactive = console.is_terminal if interactive is None else interactive
        self.started = time.monotonic()
        self._last_log = self.started
        self._last_logged: tuple[int, int] | None = None  # (done, failed) of the last line, not printed twice
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __repr__(self) -> str:
        return f"RunProgress(done={self.done}, failed={self.failed}, total={self.total})"

    def __enter__(self) -> RunProgress:
        if self.interactive and not self.quiet:
            self._bar = Progress(
                TextColumn("[bold]prompts"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]}/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("run", total=self.total, failed=0, rate="0.0")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
        elif not self.quiet and self._last_logged != (self.done, self.failed):
            self._log_line()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def add(self, ok: int, failed: int) -> None:
        self.done += ok + failed
        self.failed += failed
        if self._bar is not None:
            self._refresh()
        elif not self.quiet and time.monotonic() - self._last_log >= self.LOG_EVERY_S:
            self._log_line()

    def _refresh(self) -> None:
        assert self._bar is not None and self._task is not None
        self._bar.update(self._task, completed=self.done, failed=self.failed, rate=f"{self.rate:.1f}")

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        self._last_logged = (self.done, self.failed)
        rate = self.rate
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 and left > 0 else "-"
        line = f"progress: {self.done}/{self.total} done, {self.failed} failed, {rate:.1f} prompts/s, ETA {eta}"
        log.info(line)
        print(line, file=sys.stderr, flush=True)
