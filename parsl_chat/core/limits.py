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
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

__all__ = ["AgentLimits", "ServerLoad", "SharedTokenBucket", "TokenBucket", "server_load"]

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
        self._metrics_checked = -math.inf
        #: the server's own figures at the last /metrics read: requests it is generating, and waiting for a slot
        self.server_load: ServerLoad | None = None
        self._in_flight_at_read = 0  # this worker's requests in flight when server_load was read
        #: the most requests the server was seen generating at once, and (once it had a queue) its slots
        self.server_running_seen = 0
        self.server_slots: int | None = None
        self.latency_s: float | None = None  # moving average of this agent's answer time (least_loaded)
        #: moving average of the server's own time per request (prompt + generation, without waiting for a
        #: slot), from llama-server's per-response timings; None when the server gives none
        self.service_s: float | None = None

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

    def observe_latency(self, seconds: float, server_s: float | None = None) -> None:
        """Moving averages of answer times and of the server's own time per answer (least_loaded)."""
        self.latency_s = seconds if self.latency_s is None else 0.8 * self.latency_s + 0.2 * seconds
        if server_s is not None and server_s > 0:
            self.service_s = server_s if self.service_s is None else 0.8 * self.service_s + 0.2 * server_s

    def on_success(self, completion_tokens: int, prompt_tokens: int) -> None:
        self.tokens.charge(completion_tokens)
        if self.window < self.max_slots:
            self.window = min(self.max_slots, self.window + 1.0 / max(1.0, self.window))

    def on_failure(self, error_type: str) -> None:
        if error_type in _THROTTLE:
            self.window = max(1.0, self.window / 2)

    async def refresh_server_load(self, client: Any, agent: Any) -> None:
        """least_loaded: read the server's /metrics again if the last read is older than :data:`METRICS_EVERY_S`.

        Servers without ``/metrics`` (or with it disabled) keep ``server_load`` None.
        """
        now = time.monotonic()
        if now - self._metrics_checked < METRICS_EVERY_S:
            return
        self._metrics_checked = now
        in_flight = self.in_flight
        self.server_load = await server_load(client, agent.endpoint)
        self._in_flight_at_read = in_flight
        load = self.server_load
        if load is not None:
            self.server_running_seen = max(self.server_running_seen, load.running)
            if load.slots is not None:  # the server says (llama-server)
                self.server_slots = load.slots
            elif load.waiting > 0 and load.running > 0:  # every slot busy: running is the slot count
                self.server_slots = max(self.server_slots or 0, load.running)

    def server_requests(self) -> int:
        """Requests at this agent's server now: its last /metrics figure (every client's requests), moved
        by this worker's own requests sent or answered since; this worker's requests without metrics."""
        if self.server_load is None:
            return self.in_flight
        at_read = self.server_load.running + self.server_load.waiting
        return max(self.in_flight, at_read + self.in_flight - self._in_flight_at_read)

    def expected_s(self) -> float | None:
        """least_loaded: when one more request sent to this agent now would be answered, in seconds.

        The server answers ``slots`` requests at a time, each in about ``service_s`` (its own
        timings; else the answer time seen here). With continuous batching a slot frees every
        ``service_s / slots`` on average, so a request behind ``k`` others waits for
        ``k + 1 - slots`` of them before its own ``service_s``. Slots are the most the server was
        seen running once it had a queue, else this agent's concurrency. None before the first answer.
        """
        per_request = self.service_s if self.service_s is not None else self.latency_s
        if per_request is None:
            return None
        return per_request * (1 + self.requests_ahead() / self.slots_estimate())

    def slots_estimate(self) -> int:
        """The server's slots: as it says (llama-server's /props) or as seen once it had a queue, else this
        agent's concurrency (or more, if seen running)."""
        return max(1, self.server_slots if self.server_slots is not None else max(self.max_slots, self.server_running_seen))

    def requests_ahead(self) -> int:
        """How many requests one more request would wait behind for a slot at this agent's server (0: one is free)."""
        return max(0, self.server_requests() + 1 - self.slots_estimate())


#: how often least_loaded reads an agent's /metrics (per worker process): the routing acts on it
METRICS_EVERY_S = 0.25
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


@dataclass(frozen=True)
class ServerLoad:
    """A server's own view of its requests: being generated (in a slot) and waiting for one."""

    running: int
    waiting: int
    slots: int | None = None  # how many it can run at once, where the server says (llama-server's /props)


#: Prometheus gauges per figure: llama.cpp's llama-server (--metrics), vLLM
_RUNNING_METRICS = ("llamacpp:requests_processing", "vllm:num_requests_running")
_WAITING_METRICS = ("llamacpp:requests_deferred", "vllm:num_requests_waiting")


def _gauge_sum(text: str, names: tuple[str, ...]) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(names):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return int(total)


async def server_load(client: Any, endpoint: str) -> ServerLoad | None:
    """Requests running and waiting at the server, from its Prometheus metrics; None without metrics.

    A server without metrics is not asked again; one that did not answer is asked
    again after :data:`METRICS_RETRY_S` (one slow moment must not turn the probe off for the run).
    """
    base = endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint
    if time.monotonic() < _NO_METRICS.get(base, -math.inf):
        return None
    text, status = await _metrics_text(client, f"{base}/metrics")
    if text is None:
        _NO_METRICS[base] = math.inf if status in _METRICS_ABSENT else time.monotonic() + METRICS_RETRY_S
        return None
    _NO_METRICS.pop(base, None)
    slots = None
    if "llamacpp:" in text:
        if base not in _SLOTS:
            _SLOTS[base] = await _llama_server_slots(client, base)
        slots = _SLOTS[base]
    return ServerLoad(running=_gauge_sum(text, _RUNNING_METRICS), waiting=_gauge_sum(text, _WAITING_METRICS), slots=slots)


#: endpoint base -> llama-server's slot count (/props total_slots), None if it did not say; asked once
_SLOTS: dict[str, int | None] = {}


async def _llama_server_slots(client: Any, base: str) -> int | None:
    """llama-server's parallel slots, from its /props (``total_slots``); None if it did not answer."""
    text, _ = await _metrics_text(client, f"{base}/props")
    if text is None:
        return None
    try:
        slots = json.loads(text).get("total_slots")
    except (ValueError, AttributeError):
        return None
    return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None


async def _server_waiting(client: Any, endpoint: str) -> int:
    """Requests waiting in the server's own queue (0 if it has no metrics)."""
    load = await server_load(client, endpoint)
    return load.waiting if load is not None else 0
