"""What every execution target answers: the :class:`Target` protocol, and helpers shared by the providers."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...config import ProfileConfig

__all__ = ["Cancelled", "Target", "python_bin_on_path", "worker_init"]


@dataclass(frozen=True)
class Cancelled:
    """What a target ended of an earlier driver's scheduler work, in the words its messages use."""

    verb: str  #: "cancelled", "deleted"
    what: str  #: "SLURM job(s)", "pod(s)"
    done: list[str]  #: the ids or names ended
    nothing: str  #: the line ``cleanup`` prints when nothing was left


class Target(Protocol):
    """One place to run Parsl blocks (a profile's ``executor``): everything that differs between targets."""

    #: the profile's ``executor`` value (its profile class's ``EXECUTOR``, config/profiles.py)
    name: str
    #: profile keys that apply to this target only (the fields its profile class adds to ``BaseProfile``)
    keys: tuple[str, ...]
    #: workers run on the driver's own machine: a loopback interchange, one model server on the driver serves them
    workers_on_driver: bool
    #: the first chunks may be answered in-process while Parsl's workers start (profile ``warm_start``)
    warm_start: bool
    #: blocks are processes on this machine (their provider job ids are pids a SIGKILLed driver orphans)
    local_blocks: bool
    #: where workers write their logs when they cannot reach the driver's run directory (None: they can)
    worker_logdir: str | None

    def provider(self, profile: ProfileConfig, run_id: str) -> Any:
        """The Parsl execution provider for this profile (parsl imported here, not before)."""
        ...

    def nodes(self, profile: ProfileConfig) -> int:
        """Nodes per block."""
        ...

    def blocks(self, profile: ProfileConfig) -> int:
        """Blocks running at most."""
        ...

    def plan_lines(self, profile: ProfileConfig) -> list[str]:
        """Where work will run, for ``--dry-run``."""
        ...

    def job_id(self, provider_job_id: str) -> str | None:
        """The scheduler job a block runs in, from its provider's job id (None: no scheduler job)."""
        ...

    def run_record(self, profile: ProfileConfig, run_id: str, previous: dict[str, Any]) -> dict[str, Any]:
        """Entries for run.json that a later ``cleanup`` needs to find this run's jobs without the driver."""
        ...

    def cancel(self, meta: dict[str, Any]) -> Cancelled | None:
        """End the scheduler jobs a run (its run.json) left behind; None where the target starts none."""
        ...

    def after_shutdown(self, provider: Any, job_ids: list[str]) -> None:
        """After Parsl's own cleanup: end what it leaves behind."""
        ...


def python_bin_on_path() -> str:
    """Parsl starts the interchange and workers by name: this Python's bin/ must be on PATH."""
    return str(Path(sys.executable).parent)


def worker_init(profile: ProfileConfig) -> str:
    """Jobs run process_worker_pool.py by name: put this Python first unless the user set it up."""
    return profile.worker_init or f"export PATH={python_bin_on_path()}:$PATH"
