"""Cancelling what a dead driver left behind (SLURM blocks, Kubernetes pods).

A driver killed with SIGKILL cannot cancel its Parsl blocks; they would sit in
the queue (and bill node-hours) until their walltime. The job ids are kept in
``run.json`` as the blocks start, so they can be cancelled afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

from ..io.rundir import read_run_meta
from .targets.base import Cancelled

__all__ = ["cleanup_run", "end_leftovers", "kill_orphans"]


def kill_orphans(meta: dict[str, Any]) -> list[str]:
    """Kill the local Parsl processes (interchange, worker pools) recorded for a run, if still alive.

    A process counts as ours only if its start time matches the record, so a
    reused PID is never touched.
    """
    killed = []
    for record in meta.get("processes", []):
        try:
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["started"]) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            family = [*proc.children(recursive=True), proc]
        except (psutil.Error, KeyError, TypeError):
            continue
        for member in family:
            try:
                member.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(family, timeout=5)
        killed.append(f"{record.get('role', 'process')} {record['pid']}")
    return killed


def end_leftovers(meta: dict[str, Any]) -> tuple[list[str], Cancelled | None]:
    """End what a dead driver of this run left: its local Parsl processes, then its scheduler jobs.

    Returns the processes killed and what the run's target cancelled (None: it starts no jobs).
    """
    from .targets import TARGETS

    orphans = kill_orphans(meta)
    target = TARGETS.get(str(meta.get("executor")))
    return orphans, target.cancel(meta) if target is not None else None


def cleanup_run(run_dir: Path) -> list[str]:
    """Cancel the run's scheduler jobs that are still alive; returns what was done, as lines."""
    meta = read_run_meta(run_dir)
    orphans, cancelled = end_leftovers(meta)
    lines = [f"stopped leftover local Parsl process(es): {', '.join(orphans)}"] if orphans else []
    if cancelled is None:
        executor = meta.get("executor")
        return lines or [f"nothing to clean up: no process of this run is left (executor {executor!r} starts no scheduler jobs)"]
    if cancelled.done:
        return [*lines, f"{cancelled.verb} {cancelled.what}: {', '.join(cancelled.done)}"]
    return [*lines, cancelled.nothing]
