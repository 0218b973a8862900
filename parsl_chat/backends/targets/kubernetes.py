"""``kubernetes``: one pod per block (Parsl's KubernetesProvider, as built in :mod:`parsl_chat.backends.kube`)."""

from __future__ import annotations

from typing import Any

from ...config import KubernetesProfile, ProfileConfig, own_keys
from .base import Cancelled, worker_init

__all__ = ["Kubernetes"]


class Kubernetes:
    name = KubernetesProfile.EXECUTOR
    keys = own_keys(KubernetesProfile)  # the keys only this target takes
    workers_on_driver = False
    warm_start = False
    local_blocks = False
    worker_logdir: str | None = "/tmp/parsl-chat-workers"  # pods have no access to the driver's run directory

    def provider(self, profile: ProfileConfig, run_id: str) -> Any:
        from ..kube import kubernetes_provider

        # the run id names and labels the pods, so `parsl-chat cleanup` can find them
        return kubernetes_provider(profile, worker_init(profile), run_id)

    def nodes(self, profile: ProfileConfig) -> int:
        return profile.nodes_per_block

    def blocks(self, profile: ProfileConfig) -> int:
        return profile.max_blocks

    def plan_lines(self, profile: ProfileConfig) -> list[str]:
        return [
            f"executor: kubernetes, namespace {profile.namespace}, image {profile.image}",
            f"blocks (pods): init {profile.init_blocks}, max {profile.max_blocks}; {profile.workers} workers per pod; "
            f"pod cpu {profile.pod_cpu}, memory {profile.pod_memory}",
        ]

    def job_id(self, provider_job_id: str) -> str | None:
        return str(provider_job_id)  # the pod's name

    def run_record(self, profile: ProfileConfig, run_id: str, previous: dict[str, Any]) -> dict[str, Any]:
        from ..kube import cluster_record

        # how `cleanup` reaches this cluster later, whatever the environment then
        return {"kubernetes": previous.get("kubernetes") or cluster_record(profile, run_id)}

    def cancel(self, meta: dict[str, Any]) -> Cancelled | None:
        from ..kube import delete_run_pods

        return Cancelled(
            verb="deleted", what="pod(s)", done=delete_run_pods(meta), nothing="nothing to delete: no pod of this run is left"
        )

    def after_shutdown(self, provider: Any, job_ids: list[str]) -> None:
        from ..kube import delete_provider_pods

        delete_provider_pods(provider)  # Parsl leaves Failed pods, and all of a bad-state executor's
