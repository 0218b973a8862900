"""Execution targets: one module per place Parsl blocks run, behind one :class:`Target` protocol.

A profile's ``executor`` names its target; :func:`target_for` finds it. Nothing
outside this package tests ``executor`` names: it asks the target.

To add a target (PBS Pro, LSF, Flux: Parsl has providers for all three): write
one module here with a class that has every member of :class:`Target`, add one
line to :data:`TARGETS`, and write its profile class in
``parsl_chat/config/profiles.py`` (its ``EXECUTOR`` and the keys only it takes;
listed in ``PROFILES`` and as a base of ``ProfileConfig``); tests/backends/test_targets.py
checks that config and the registry agree.
"""

from __future__ import annotations

from ...config import ProfileConfig
from ...errors import ConfigError
from .allocation import Allocation
from .base import Cancelled, Target, python_bin_on_path, worker_init
from .kubernetes import Kubernetes
from .local import Local
from .slurm import Slurm

__all__ = ["TARGETS", "Cancelled", "Target", "model_servers", "python_bin_on_path", "target_for", "total_workers", "worker_init"]

#: every target by its profile ``executor`` name
TARGETS: dict[str, Target] = {
    "local": Local(),
    "slurm": Slurm(),
    "slurm-allocation": Allocation(),
    "kubernetes": Kubernetes(),
}


def target_for(profile: ProfileConfig) -> Target:
    """The profile's target (config validation has already refused an unknown ``executor``)."""
    try:
        return TARGETS[profile.executor]
    except KeyError:
        raise ConfigError(f"unknown executor {profile.executor!r}; valid executors: {', '.join(TARGETS)}") from None


def total_workers(profile: ProfileConfig) -> int:
    """Worker processes when every block the profile allows is running."""
    target = target_for(profile)
    return profile.workers * target.nodes(profile) * target.blocks(profile)


def model_servers(profile: ProfileConfig) -> tuple[int, int | None]:
    """How many nodes run an embedded model server for a run on ``profile``, and each one's cores
    when the profile says so (None: sized from this machine's, as on the driver itself)."""
    nodes = max(1, total_workers(profile) // max(1, profile.workers))
    on_nodes = not target_for(profile).workers_on_driver
    return nodes, profile.cores_per_node if on_nodes and profile.cores_per_node else None
