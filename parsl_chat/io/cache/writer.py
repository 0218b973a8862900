"""Appending answers: each writer process has its own segment file, sealed by a rename, no lock."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .segment import OPEN, SEALED, SEGMENTS

__all__ = ["IDLE_SEAL_S", "ROLL_S", "Writer"]

#: a writer moves to a new segment this long after opening one, so no segment stays open for
#: long: compaction may take an unsealed segment untouched for ``idle_s`` (a writer that died)
ROLL_S = 60.0
#: a writer seals its segment after this long without a new answer (Parsl may end its
#: process without running atexit; an idle writer's answers should not wait in an open file)
IDLE_SEAL_S = 5.0

# --------------------------------------------------------------------------- writing


class Writer:
    """Appends answers to this process's own segment; a new segment every ROLL_S, sealed when done."""

    def __init__(self, root: Path) -> None:
        self.segments = root / SEGMENTS
        self.path: Path | None = None
        self._fd: int | None = None
        self._opened = 0.0
        self._lock = threading.Lock()  # the loop thread writes; atexit and the idle timer seal
        self._last_write = 0.0
        self.written = 0
        self.timer: Any = None  # the idle-seal check pending on the writing event loop

    def __repr__(self) -> str:
        return f"Writer({str(self.path)!r}, written={self.written})"

    def append(self, line: bytes) -> None:
        with self._lock:
            if self._fd is None or time.monotonic() - self._opened > ROLL_S:
                self._seal()
                self._open()
            assert self._fd is not None
            try:
                done = os.write(self._fd, line)  # one write per line, O_APPEND: lines of one writer never interleave
            except OSError:
                self._abandon()
                raise
            if done != len(line):  # a short write (quota, disk full): the tail is torn; leave this file
                self._abandon()
                raise OSError(f"short write to {self.path}")
            self.written += 1
            self._last_write = time.monotonic()

    def _open(self) -> None:
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{OPEN}"
        self.path = self.segments / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._opened = time.monotonic()

    def seal_if_idle(self) -> bool:
        """Seal when nothing was written for IDLE_SEAL_S; True when there is nothing left open."""
        with self._lock:
            if self._fd is not None and time.monotonic() - self._last_write >= IDLE_SEAL_S:
                self._seal()
            return self._fd is None

    def seal(self) -> None:
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        if self._fd is None or self.path is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(self.path, self.path.with_suffix(SEALED))
        except FileNotFoundError:
            pass  # a `cache clear` or a compaction of a writer thought dead took it: nothing to seal

    def _abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            try:
                os.rename(self.path, self.path.with_suffix(SEALED))  # sealed: readers skip its torn tail
            except OSError:
                pass
