"""What a profile means for where work runs: nodes, workers, the plan for --dry-run, scancel.

Each answer comes from the profile's target (:mod:`parsl_chat.backends.targets`);
the Parsl executor itself is built by :mod:`parsl_chat.backends.parsl`.
"""

from __future__ import annotations

from ..config import ProfileConfig
from .targets import target_for, total_workers
from .targets.allocation import allocation_nodes
from .targets.slurm import cancel_slurm_jobs

__all__ = ["allocation_nodes", "cancel_slurm_jobs", "nodes_per_block", "plan_lines", "total_workers"]


def nodes_per_block(profile: ProfileConfig) -> int:
    return target_for(profile).nodes(profile)


def plan_lines(profile: ProfileConfig) -> list[str]:
    """Human description of where work will run, for --dry-run."""
    return target_for(profile).plan_lines(profile)
