"""Where work runs: one profile class per execution target, holding the keys valid there.

:class:`BaseProfile` has the keys every target reads; :class:`LocalProfile`,
:class:`SlurmProfile`, :class:`AllocationProfile` and :class:`KubernetesProfile`
add their own. :class:`ProfileConfig` is all of them at once (what the rest of
the code is handed); a profile file may set a target's own keys only when its
``executor`` is that target (:func:`executors_taking`). The targets themselves
live in ``backends/targets/`` (a layer above), one module per class here;
tests/backends/test_targets.py checks that the two agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .schema import short_repr

__all__ = [
    "EXECUTORS",
    "PROFILES",
    "AllocationProfile",
    "BaseProfile",
    "KubernetesProfile",
    "LocalProfile",
    "ProfileConfig",
    "SlurmProfile",
    "executors_taking",
    "own_keys",
    "profile_class",
]


@dataclass(frozen=True)
class BaseProfile:
    """The keys of every profile: the Parsl executor, its blocks and scaling."""

    SECTION: ClassVar[str] = "profile"
    #: the ``executor`` value that selects this class (empty here: no target is only the base)
    EXECUTOR: ClassVar[str] = ""

    name: str = "local"
    description: str = ""
    executor: str = "local"
    workers: int = 2  # worker processes per node; each runs many requests concurrently
    nodes_per_block: int = 1
    init_blocks: int = 1
    min_blocks: int = 0
    max_blocks: int = 1
    walltime: str = "01:00:00"
    cores_per_node: int | None = None
    worker_init: str = ""
    strategy: str = "simple"  # Parsl scaling strategy: none, simple, htex_auto_scale
    strategy_period_s: float = 1.0
    max_idletime_s: float = 60.0
    status_polling_s: int = 2  # Parsl's default of 60 s delays the first result on SLURM
    address: str | None = None  # interchange address workers connect to (auto when unset)


@dataclass(frozen=True)
class LocalProfile(BaseProfile):
    """``local``: worker processes on this machine."""

    EXECUTOR: ClassVar[str] = "local"

    warm_start: bool = True  # answer the first chunks in-process while Parsl's workers start


@dataclass(frozen=True)
class SlurmProfile(BaseProfile):
    """``slurm``: blocks submitted as SLURM jobs."""

    EXECUTOR: ClassVar[str] = "slurm"

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    mem_per_node_gb: float | None = None
    scheduler_options: str = ""


@dataclass(frozen=True)
class AllocationProfile(BaseProfile):
    """``slurm-allocation``: one block on the nodes of the SLURM job the driver runs in (no keys of its own)."""

    EXECUTOR: ClassVar[str] = "slurm-allocation"


@dataclass(frozen=True)
class KubernetesProfile(BaseProfile):
    """``kubernetes``: blocks as pods."""

    EXECUTOR: ClassVar[str] = "kubernetes"

    namespace: str = "default"
    image: str = "python:3.11-slim"
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    node_selector: dict[str, str] = field(default_factory=dict)
    pod_cpu: str = "1"
    pod_memory: str = "1Gi"
    kubeconfig: str | None = None
    context: str | None = None


@dataclass(frozen=True)
class ProfileConfig(KubernetesProfile, AllocationProfile, SlurmProfile, LocalProfile):
    """A resolved profile: every target's keys (those of other targets keep their defaults).

    Its fields are the base keys, then each target's in :data:`PROFILES` order.
    """

    EXECUTOR: ClassVar[str] = ""

    def __repr__(self) -> str:
        return short_repr(self, always=("name", "executor"))


#: every target's profile class, in the order executors are listed
PROFILES: tuple[type[BaseProfile], ...] = (LocalProfile, SlurmProfile, AllocationProfile, KubernetesProfile)
#: the execution targets' names (each a module in backends/targets/)
EXECUTORS = tuple(cls.EXECUTOR for cls in PROFILES)
_BY_EXECUTOR = {cls.EXECUTOR: cls for cls in PROFILES}


def own_keys(cls: type[BaseProfile]) -> tuple[str, ...]:
    """The keys a target's profile class adds to the base."""
    base = {f.name for f in dataclasses.fields(BaseProfile)}
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in base)


def profile_class(executor: str) -> type[BaseProfile] | None:
    """The profile class of an ``executor`` name; None for an unknown one."""
    return _BY_EXECUTOR.get(executor)


def executors_taking(key: str) -> tuple[str, ...]:
    """The executors whose profiles have ``key`` (every executor for a base key)."""
    return tuple(cls.EXECUTOR for cls in PROFILES if key in {f.name for f in dataclasses.fields(cls)})
