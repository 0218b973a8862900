"""Which agent answers which prompt.

``round_robin`` assigns every prompt in the driver, deterministically (smooth
weighted round-robin, so weights 2:1:1 give 50/25/25 % interleaved).
``least_loaded`` leaves unpinned prompts unassigned: inside the worker, the
next free slot of any agent takes the next prompt, so an agent that answers
slowly holds its slots longer and ends up with proportionally fewer prompts.
Where the endpoint exposes Prometheus ``/metrics`` (llama.cpp, vLLM), a slot
whose server already has a queue waits briefly before taking more.
"""

from __future__ import annotations

from collections.abc import Sequence

from .agents import AgentSpec
from .errors import ConfigError

__all__ = ["ROUTINGS", "Router", "SmoothRoundRobin"]

ROUTINGS = ("round_robin", "least_loaded")


class SmoothRoundRobin:
    """nginx's smooth weighted round-robin: even interleaving, exact proportions."""

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights:
            raise ValueError("at least one weight")
        self.weights = list(weights)
        self.current = [0.0] * len(weights)
        self.total = float(sum(weights))

    def next(self) -> int:
        for i, w in enumerate(self.weights):
            self.current[i] += w
        best = max(range(len(self.weights)), key=lambda i: self.current[i])
        self.current[best] -= self.total
        return best


class Router:
    """Driver-side routing: pinned prompts go to their agent, the rest per policy."""

    def __init__(self, agents: Sequence[AgentSpec], policy: str = "round_robin") -> None:
        if policy not in ROUTINGS:
            raise ConfigError(f"unknown routing {policy!r}; valid: {', '.join(ROUTINGS)}")
        self.policy = policy
        self.index = {agent.name: i for i, agent in enumerate(agents)}
        self.names = [agent.name for agent in agents]
        self._rr = SmoothRoundRobin([agent.weight for agent in agents])

    def __repr__(self) -> str:
        return f"Router(policy={self.policy!r}, agents={self.names!r})"

    def unknown_pins(self, pinned: Sequence[str]) -> list[str]:
        return [name for name in pinned if name not in self.index]

    def assign(self, pinned: str | None) -> int | None:
        """Agent index for a prompt, or None to let the worker's free slots decide."""
        if pinned is not None:
            return self.index[pinned]
        if self.policy == "round_robin":
            return self._rr.next()
        return None
