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

__all__ = ["cleanup_run", "kill_orphans"]


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


def cleanup_run(run_dir: Path) -> list[str]:
    """Cancel the run's scheduler jobs that are still alive; returns what was done, as lines."""
    meta = read_run_meta(run_dir)
    executor = meta.get("executor")
    lines = []
    orphans = kill_orphans(meta)
    if orphans:
        lines.append(f"stopped leftover local Parsl process(es): {', '.join(orphans)}")
    from .targets import TARGETS

    target = TARGETS.get(str(executor))
    cancelled = target.cancel(meta) if target is not None else None
    if cancelled is None:
        return lines or [f"nothing to clean up: no process of this run is left (executor {executor!r} starts no scheduler jobs)"]
    if cancelled.done:
        return [*lines, f"{cancelled.verb} {cancelled.what}: {', '.join(cancelled.done)}"]
    return [*lines, cancelled.nothing]
