"""Whether a process of this host still runs: for locks and files a process leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pid_alive", "proc_start_time"]


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a process: tells a live process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start_time``, is still the same process).

    A zombie counts as ended: kill(0) succeeds on it, and where PID 1 does not reap
    (some containers) an ended process's zombie stays for as long as the machine runs.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True  # no /proc: trust kill(0)
    if state in ("Z", "X"):
        return False
    return start_time is None or proc_start_time(pid) == start_time
