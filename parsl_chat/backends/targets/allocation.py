"""``slurm-allocation``: one block over the nodes of the SLURM job this driver runs in (srun, no submission)."""

from __future__ import annotations

import os
from typing import Any

from ...config import AllocationProfile, ProfileConfig, own_keys
from ...errors import ExecutorError
from .base import Cancelled, worker_init

__all__ = ["Allocation", "allocation_nodes"]


def allocation_nodes() -> int:
    """Nodes of the SLURM allocation this process runs in (``slurm-allocation``)."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    raise ExecutorError(
        "profile 'slurm-allocation' runs inside a SLURM job, but no SLURM allocation was found (SLURM_JOB_NUM_NODES unset)",
        hint="submit with 'sbatch jobs/chat_batch.sh PROMPTS', or use --profile slurm to let parsl-chat submit jobs",
    )


class Allocation:
    name = AllocationProfile.EXECUTOR
    keys = own_keys(AllocationProfile)  # the keys only this target takes
    workers_on_driver = False
    warm_start = False
    local_blocks = True  # LocalProvider: the block is an srun process of this driver
    worker_logdir: str | None = None

    def provider(self, profile: ProfileConfig, run_id: str) -> Any:
        from parsl.launchers import SrunLauncher
        from parsl.providers import LocalProvider

        return LocalProvider(
            nodes_per_block=allocation_nodes(),
            launcher=SrunLauncher(overrides="--ntasks-per-node=1"),
            init_blocks=1,
            min_blocks=1,
            max_blocks=1,
            worker_init=worker_init(profile),
        )

    def nodes(self, profile: ProfileConfig) -> int:
        return allocation_nodes()

    def blocks(self, profile: ProfileConfig) -> int:
        return 1

    def plan_lines(self, profile: ProfileConfig) -> list[str]:
        return [
            f"executor: slurm-allocation (inside job {os.environ.get('SLURM_JOB_ID', '?')}): "
            f"1 block of {self.nodes(profile)} node(s), {profile.workers} workers per node, no further submission"
        ]

    def job_id(self, provider_job_id: str) -> str | None:
        return os.environ.get("SLURM_JOB_ID")  # the block's id is a pid; the job is this driver's

    def run_record(self, profile: ProfileConfig, run_id: str, previous: dict[str, Any]) -> dict[str, Any]:
        return {}

    def cancel(self, meta: dict[str, Any]) -> Cancelled | None:
        return None  # the allocation is the user's job: its srun processes are ended by cleanup.kill_orphans

    def after_shutdown(self, provider: Any, job_ids: list[str]) -> None:
        pass
