"""How much each agent may be asked at once, and how fast.

:class:`AgentLimits` is one agent's budget inside one worker process:

* a concurrency window that starts at the configured slots, halves on 429s
  and timeouts and grows by one slot per window of successes (AIMD, as TCP
  does), never above the configured limit;
* requests-per-minute and tokens-per-minute token buckets, shared by all
  worker processes of a node (a limit is a per-node budget).
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx

__all__ = ["AgentLimits", "SharedTokenBucket", "TokenBucket"]

#: failures that mean "too much": shrink the window
_THROTTLE = frozenset({"rate_limit", "timeout"})


class TokenBucket:
    """A per-minute budget refilled continuously; ``rate_per_min`` 0 means unlimited."""

    def __init__(self, rate_per_min: float) -> None:
        self.rate = rate_per_min / 60.0
        self.capacity = max(1.0, rate_per_min / 60.0 * 5)  # at most ~5 s of burst
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float = 1.0) -> None:
        if self.rate <= 0:
            return
        while True:
            self._refill()
            if self.level >= min(amount, self.capacity):
                self.level -= amount  # may go negative for a large request: later ones wait it off
                return
            await asyncio.sleep((min(amount, self.capacity) - self.level) / self.rate)

    def charge(self, amount: float) -> None:
        """Account for usage known only afterwards (tokens of the answer)."""
        if self.rate > 0:
            self._refill()
            self.level -= amount


class SharedTokenBucket(TokenBucket):
    """A token bucket kept in a node-local file, so every worker process on the node draws from one budget.

    Each take is a short ``flock``-ed read-modify-write (tens of microseconds);
    it is used only when a rate limit is configured.
    """

    def __init__(self, rate_per_min: float, path: Path) -> None:
        super().__init__(rate_per_min)
        self.path = path
        if self.rate > 0:
            path.parent.mkdir(parents=True, exist_ok=True)

    def _update(self, amount: float, *, must_fit: bool) -> float:
        """Take ``amount`` if it fits (or unconditionally); returns seconds to wait, 0 when taken."""
        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            try:
                level, stamp = (float(x) for x in fh.read().split())
            except ValueError:  # new file
                level, stamp = self.capacity, time.time()
            now = time.time()
            level = min(self.capacity, level + max(0.0, now - stamp) * self.rate)
            need = min(amount, self.capacity)
            wait = 0.0
            if must_fit and level < need:
                wait = (need - level) / self.rate
            else:
                level -= amount
            fh.seek(0)
            fh.truncate()
            fh.write(f"{level} {now}")
            return wait

    async def take(self, amount: float = 1.0) -> None:
        if self.rate <= 0:
            return
        while (wait := self._update(amount, must_fit=True)) > 0:
            await asyncio.sleep(wait)

    def charge(self, amount: float) -> None:
        if self.rate > 0:
            self._update(amount, must_fit=False)


class AgentLimits:
    """One agent's concurrency window and rate budgets in this worker."""

    def __init__(
        self, max_slots: int, requests_per_minute: int = 0, tokens_per_minute: int = 0, shared_dir: Path | None = None
    ) -> None:
        self.max_slots = max_slots
        self.window = float(max_slots)
        self.in_flight = 0
        self._cond: asyncio.Condition | None = None
        # rate budgets are per node: the workers of one node share them through a file
        if shared_dir is not None:
            self.requests: TokenBucket = SharedTokenBucket(requests_per_minute, shared_dir / "requests.bucket")
            self.tokens: TokenBucket = SharedTokenBucket(tokens_per_minute, shared_dir / "tokens.bucket")
        else:
            self.requests = TokenBucket(requests_per_minute)
            self.tokens = TokenBucket(tokens_per_minute)
        self._metrics_checked = 0.0
        self._server_waiting = 0
        self.latency_s: float | None = None  # moving average of this agent's answer time (least_loaded)

    def __repr__(self) -> str:
        return f"AgentLimits(window={self.window:.1f}/{self.max_slots}, in_flight={self.in_flight})"

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # created lazily: it binds to the running loop
            self._cond = asyncio.Condition()
        return self._cond

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self.cond:
            await self.cond.wait_for(lambda: self.in_flight < max(1, int(self.window)))
            self.in_flight += 1
        try:
            yield
        finally:
            async with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()

    async def admit(self, prompt: dict[str, Any]) -> None:
        """Wait for the request and token budgets (prompt tokens estimated from characters)."""
        await self.requests.take(1)
        if self.tokens.rate > 0:
            chars = sum(len(str(m.get("content", ""))) for m in prompt.get("messages", ()))
            await self.tokens.take(max(1, chars // 4))

    def observe_latency(self, seconds: float) -> None:
        """Exponential moving average of answer times; least_loaded uses it to leave the last items to faster agents."""
        self.latency_s = seconds if self.latency_s is None else 0.8 * self.latency_s + 0.2 * seconds

    def on_success(self, completion_tokens: int, prompt_tokens: int) -> None:
        self.tokens.charge(completion_tokens)
        if self.window < self.max_slots:
            self.window = min(self.max_slots, self.window + 1.0 / max(1.0, self.window))

    def on_failure(self, error_type: str) -> None:
        if error_type in _THROTTLE:
            self.window = max(1.0, self.window / 2)

    async def wait_for_server_queue(self, client: Any, agent: Any) -> None:
        """least_loaded: hold back while this agent's server reports a queue of its own.

        Servers without ``/metrics`` (or with it disabled) are treated as having no queue.
        """
        now = time.monotonic()
        if now - self._metrics_checked > 1.0:
            self._metrics_checked = now
            self._server_waiting = await _server_waiting(client, agent.endpoint)
        if self._server_waiting > 0:
            await asyncio.sleep(min(0.05 * self._server_waiting, 0.5))


#: endpoint base -> monotonic time before which its /metrics is not asked again
_NO_METRICS: dict[str, float] = {}
#: after a timeout, a refused connection or a 5xx: the server may be busy or restarting, ask again later
METRICS_RETRY_S = 30.0
#: answers that mean "this server has no metrics": never asked again in this process
_METRICS_ABSENT = frozenset({401, 403, 404, 405, 501})


async def _metrics_text(client: Any, url: str) -> tuple[str | None, int | None]:
    """(body, None) on 200; (None, status) for another answer; (None, None) when there was no answer."""
    if isinstance(client, aiohttp.ClientSession):
        try:
            async with client.get(url, timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                return (await resp.text(), None) if resp.status == 200 else (None, resp.status)
        except (aiohttp.ClientError, TimeoutError):
            return None, None
    try:
        response = await client.get(url, timeout=0.5)
    except httpx.HTTPError:
        return None, None
    return (response.text, None) if response.status_code == 200 else (None, response.status_code)


async def _server_waiting(client: Any, endpoint: str) -> int:
    """Requests waiting in the server's own queue, from Prometheus metrics (llama.cpp, vLLM).

    A server without metrics is not asked again; one that did not answer is asked
    again after :data:`METRICS_RETRY_S` (one slow moment must not turn the probe off for the run).
    """
    base = endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint
    if time.monotonic() < _NO_METRICS.get(base, -math.inf):
        return 0
    text, status = await _metrics_text(client, f"{base}/metrics")
    if text is None:
        _NO_METRICS[base] = math.inf if status in _METRICS_ABSENT else time.monotonic() + METRICS_RETRY_S
        return 0
    _NO_METRICS.pop(base, None)
    waiting = 0.0
    for line in text.splitlines():
        if line.startswith(("llamacpp:requests_deferred", "vllm:num_requests_waiting")):
            try:
                waiting += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return int(waiting)
