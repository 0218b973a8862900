"""``local``: one block of worker processes on this machine (Parsl's LocalProvider)."""

from __future__ import annotations

from typing import Any

from ...config import LocalProfile, ProfileConfig, own_keys
from .base import Cancelled

__all__ = ["Local"]


class Local:
    name = LocalProfile.EXECUTOR
    keys = own_keys(LocalProfile)  # the keys only this target takes
    workers_on_driver = True
    warm_start = True
    local_blocks = True
    worker_logdir: str | None = None

    def provider(self, profile: ProfileConfig, run_id: str) -> Any:
        from parsl.providers import LocalProvider

        return LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=profile.worker_init)

    def nodes(self, profile: ProfileConfig) -> int:
        return 1

    def blocks(self, profile: ProfileConfig) -> int:
        return 1

    def plan_lines(self, profile: ProfileConfig) -> list[str]:
        return [f"executor: local (Parsl HighThroughputExecutor on this machine), {profile.workers} worker processes"]

    def job_id(self, provider_job_id: str) -> str | None:
        return None  # LocalProvider's ids are process ids, not jobs

    def run_record(self, profile: ProfileConfig, run_id: str, previous: dict[str, Any]) -> dict[str, Any]:
        return {}

    def cancel(self, meta: dict[str, Any]) -> Cancelled | None:
        return None  # its processes are ended by cleanup.kill_orphans, as every target's

    def after_shutdown(self, provider: Any, job_ids: list[str]) -> None:
        pass
