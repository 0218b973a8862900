"""Which agent answers which prompt.

``round_robin`` assigns every prompt in the driver, deterministically (smooth
weighted round-robin, so weights 2:1:1 give 50/25/25 % interleaved).
``least_loaded`` leaves unpinned prompts unassigned: inside the worker, the
next free slot of any agent takes the next prompt, so an agent that answers
slowly holds its slots longer and ends up with proportionally fewer prompts.
A free slot takes the next prompt only if no other agent would answer it
sooner: each agent's estimate is its server's time per request (llama-server's
per-response timings, else the answer time seen) times the rounds a new
request would wait behind the requests at that server, which Prometheus
``/metrics`` gives where the endpoint has it (llama.cpp's requests_processing
and requests_deferred, vLLM's running and waiting; see ``executor`` and
``limits.AgentLimits.expected_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..errors import ConfigError
from .agents import AgentSpec
from .limits import METRICS_EVERY_S, AgentLimits

__all__ = ["ROUTINGS", "LeastLoaded", "Router", "SmoothRoundRobin"]

Item = TypeVar("Item")

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


class LeastLoaded(Generic[Item]):
    """Worker-side least_loaded within one chunk: which agent's free slot takes the next shared item.

    ``shared`` holds the chunk's unassigned items; ``limits`` and ``slots`` are per agent. Slot
    loops call :meth:`running` around their life and :meth:`answered_one` after every item, so
    that a slot waiting for its turn looks again when the agents' loads changed.
    """

    def __init__(self, limits: Sequence[AgentLimits], slots: Sequence[int], shared: deque[Item]) -> None:
        self.limits = list(limits)
        self.slots = list(slots)
        self.shared = shared
        self.live = [0] * len(self.limits)  # slot loops still running, per agent
        self.answered = asyncio.Condition()  # notified after every item: the agents' loads changed

    def worth_taking(self, idx: int) -> bool:
        """A slow agent leaves the chunk's last shared items to faster ones.

        It takes one only if the faster agents' free-running slots would not clear the
        queue before its own answer came back; otherwise the chunk would end waiting for it.
        An agent's rate is its slots over its time per request, its slots being the fewer
        of its own and its server's (a 1-slot server behind 8 client slots answers one at a time).
        """
        mine = self.limits[idx].expected_s()
        if mine is None:
            return True
        faster = 0.0
        for j, (lim, slots) in enumerate(zip(self.limits, self.slots, strict=True)):
            theirs = lim.expected_s()
            per_request = lim.service_s if lim.service_s is not None else lim.latency_s
            if j != idx and theirs is not None and per_request and theirs < mine:
                faster += min(slots, lim.slots_estimate()) / per_request
        return len(self.shared) > faster * mine

    def best_placed(self, idx: int) -> bool:
        """This agent's server has a slot free for one more request, or no other agent would answer it sooner.

        Each agent's estimate counts the requests at its server (its /metrics, every client's,
        corrected by this worker's own since the read) against its slots: a free server slot is
        always used (idle capacity helps every prompt), a request that would wait in the server's
        queue goes there only if no other agent would answer it sooner. An agent not yet measured
        is tried with one request at a time. Ties take: no agent waits for an equal one.
        """
        lim_i = self.limits[idx]
        mine = lim_i.expected_s()
        if mine is None:  # not measured yet: one request at a time finds out (not a burst into its queue)
            return lim_i.in_flight == 0
        if lim_i.requests_ahead() == 0:
            return True
        for j, lim in enumerate(self.limits):
            if j != idx and self.live[j]:
                other = lim.expected_s()
                if other is None or other < mine:  # unmeasured: its first answer is due before this would queue
                    return False
        return True

    async def take(self, idx: int, refresh: Callable[[], Awaitable[None]], stopping: Callable[[], bool]) -> Item | None:
        """The next shared item once agent ``idx`` is the best placed for it; None when there is none for it.

        ``refresh`` reads the agent's server load (its /metrics) before each look.
        """
        while self.shared and not stopping():
            await refresh()
            if not self.shared or not self.worth_taking(idx):
                return None
            if self.best_placed(idx):
                return self.shared.popleft()
            async with self.answered:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.answered.wait(), METRICS_EVERY_S)
        return None

    async def answered_one(self) -> None:
        async with self.answered:
            self.answered.notify_all()

    @contextlib.asynccontextmanager
    async def running(self, idx: int) -> AsyncIterator[None]:
        """Counts agent ``idx``'s live slot loop: an agent with none left is no longer waited for."""
        self.live[idx] += 1
        try:
            yield
        finally:
            self.live[idx] -= 1
            await self.answered_one()
