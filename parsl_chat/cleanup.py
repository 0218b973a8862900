"""Cancelling what a dead driver left behind (SLURM blocks, Kubernetes pods).

A driver killed with SIGKILL cannot cancel its Parsl blocks; they would sit in
the queue (and bill node-hours) until their walltime. The job ids are kept in
``run.json`` as the blocks start, so they can be cancelled afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError

__all__ = ["cleanup_run"]


def cleanup_run(run_dir: Path) -> list[str]:
    """Cancel the run's scheduler jobs that are still alive; returns what was done, as lines."""
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise UsageError(f"{run_dir}: not a parsl-chat run directory (no run.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise UsageError(f"{meta_path}: unreadable run metadata") from None
    executor = meta.get("executor")
    job_ids = [str(b["job_id"]) for b in meta.get("blocks", []) if b.get("job_id")]
    if executor == "slurm":
        from .profiles import cancel_slurm_jobs

        cancelled = cancel_slurm_jobs(job_ids)
        if cancelled:
            return [f"cancelled SLURM job(s): {', '.join(cancelled)}"]
        return [f"nothing to cancel: none of the run's {len(job_ids)} SLURM job(s) is still queued or running"]
    if executor == "kubernetes":
        from .kube import delete_run_pods

        deleted = delete_run_pods(meta)
        if deleted:
            return [f"deleted pod(s): {', '.join(deleted)}"]
        return ["nothing to delete: no pod of this run is left"]
    return [f"nothing to cancel: executor {executor!r} starts no scheduler jobs"]
