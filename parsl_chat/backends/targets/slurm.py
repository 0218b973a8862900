"""``slurm``: blocks submitted as SLURM jobs (sbatch, srun in each), cancelled with scancel."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from ...config import ProfileConfig, SlurmProfile, own_keys
from ...errors import ExecutorError
from .base import Cancelled, worker_init

__all__ = ["Slurm", "cancel_slurm_jobs", "parse_slurm_duration", "slurm_time_left_s"]


def cancel_slurm_jobs(job_ids: list[str]) -> list[str]:
    """scancel the given jobs that are still queued or running; returns those cancelled."""
    if not job_ids or shutil.which("squeue") is None:
        return []
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = list(job_ids)
    alive = [j for j in job_ids if j in out]
    if alive:
        subprocess.run(["scancel", *alive], capture_output=True, timeout=20)
    return alive


def slurm_time_left_s() -> float | None:
    """Seconds left in this SLURM job (22.05 sets no SLURM_JOB_END_TIME: ask squeue)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_duration(out)


def parse_slurm_duration(text: str) -> float | None:
    """``[D-]HH:MM:SS``, ``MM:SS`` or ``SS`` as seconds; None for UNLIMITED / unparsable."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return float(days * 86400 + h * 3600 + m * 60 + s)


class Slurm:
    name = SlurmProfile.EXECUTOR
    keys = own_keys(SlurmProfile)  # the keys only this target takes
    workers_on_driver = False
    warm_start = False
    local_blocks = False
    worker_logdir: str | None = None

    def provider(self, profile: ProfileConfig, run_id: str) -> Any:
        from parsl.launchers import SrunLauncher
        from parsl.providers import SlurmProvider

        if shutil.which("sbatch") is None:
            raise ExecutorError(
                "profile 'slurm' needs the SLURM commands (sbatch, squeue), which are not on PATH",
                hint="run it on a login node of your cluster, or start the dev cluster: scripts/slurm-dev-cluster start",
            )
        poll = profile.status_polling_s

        class _Provider(SlurmProvider):  # type: ignore[misc]
            # Parsl polls squeue every 60 s by default: the first result would wait that long
            @property
            def status_polling_interval(self) -> int:
                return poll

        return _Provider(
            partition=profile.partition,
            account=profile.account,
            qos=profile.qos,
            nodes_per_block=profile.nodes_per_block,
            cores_per_node=profile.cores_per_node,
            mem_per_node=int(profile.mem_per_node_gb) if profile.mem_per_node_gb else None,
            init_blocks=profile.init_blocks,
            min_blocks=profile.min_blocks,
            max_blocks=profile.max_blocks,
            walltime=profile.walltime,
            scheduler_options=profile.scheduler_options,
            worker_init=worker_init(profile),
            exclusive=profile.exclusive,
            launcher=SrunLauncher(overrides="--ntasks-per-node=1"),
        )

    def nodes(self, profile: ProfileConfig) -> int:
        return profile.nodes_per_block

    def blocks(self, profile: ProfileConfig) -> int:
        return profile.max_blocks

    def plan_lines(self, profile: ProfileConfig) -> list[str]:
        where = f"partition {profile.partition or '(default)'}" + (f", account {profile.account}" if profile.account else "")
        workers = profile.workers * self.nodes(profile) * self.blocks(profile)
        return [
            f"executor: slurm, {where}, walltime {profile.walltime}",
            f"blocks: init {profile.init_blocks}, min {profile.min_blocks}, max {profile.max_blocks}; "
            f"{self.nodes(profile)} node(s) per block; {profile.workers} workers per node "
            f"(up to {workers} workers)",
        ]

    def job_id(self, provider_job_id: str) -> str | None:
        return str(provider_job_id)

    def run_record(self, profile: ProfileConfig, run_id: str, previous: dict[str, Any]) -> dict[str, Any]:
        return {}  # the blocks' job ids, kept in run.json's blocks, are enough

    def cancel(self, meta: dict[str, Any]) -> Cancelled | None:
        job_ids = [str(b["job_id"]) for b in meta.get("blocks", []) if b.get("job_id")]
        return Cancelled(
            verb="cancelled",
            what="SLURM job(s)",
            done=cancel_slurm_jobs(job_ids),
            nothing=f"nothing to cancel: none of the run's {len(job_ids)} SLURM job(s) is still queued or running",
        )

    def after_shutdown(self, provider: Any, job_ids: list[str]) -> None:
        cancel_slurm_jobs(job_ids)
