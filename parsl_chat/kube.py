"""Kubernetes: Parsl's KubernetesProvider built from a profile, and pod cleanup."""

from __future__ import annotations

from typing import Any

from .config import ProfileConfig
from .errors import ExecutorError

__all__ = ["delete_run_pods", "kubernetes_provider"]


def kubernetes_provider(profile: ProfileConfig, worker_init: str) -> Any:
    raise ExecutorError("the kubernetes profile is being built (issue 9)")


def delete_run_pods(meta: dict[str, Any]) -> list[str]:
    return []
