"""Unit tests for parsl_chat.core.limits: token buckets, the AIMD window, slots, server queue metrics."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import parsl_chat.core.limits as limits_mod
from parsl_chat.core.limits import AgentLimits, TokenBucket, _server_waiting


class Clock:
    """A fake monotonic clock; asyncio.sleep in limits advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # only the limits module sees the fake clock: the event loop keeps the real one
    monkeypatch.setattr(limits_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    monkeypatch.setattr(limits_mod, "asyncio", types.SimpleNamespace(sleep=c.sleep, Condition=asyncio.Condition))
    return c


@pytest.fixture(autouse=True)
def fresh_metrics_cache() -> Iterator[None]:
    limits_mod._NO_METRICS.clear()
    limits_mod._SLOTS.clear()
    yield
    limits_mod._NO_METRICS.clear()
    limits_mod._SLOTS.clear()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------- token bucket


def test_bucket_unlimited(clock: Clock) -> None:
    bucket = TokenBucket(0)
    run(_take_many(bucket, 1000, 5))
    assert clock.sleeps == []
    bucket.charge(1e9)  # no effect when unlimited
    assert bucket.rate == 0


async def _take_many(bucket: TokenBucket, times: int, amount: float = 1.0) -> None:
    for _ in range(times):
        await bucket.take(amount)


def test_bucket_burst_then_rate(clock: Clock) -> None:
    bucket = TokenBucket(60)  # 1 per second, burst of 5
    assert bucket.capacity == 5.0
    run(_take_many(bucket, 5))
    assert clock.sleeps == []
    run(_take_many(bucket, 3))
    assert clock.sleeps == pytest.approx([1.0, 1.0, 1.0])
    assert clock.now == pytest.approx(1003.0)


def test_bucket_small_rate_capacity_at_least_one(clock: Clock) -> None:
    bucket = TokenBucket(6)  # 0.1 per second
    assert bucket.capacity == 1.0
    run(_take_many(bucket, 2))
    assert clock.sleeps == pytest.approx([10.0])


def test_bucket_refills_with_time(clock: Clock) -> None:
    bucket = TokenBucket(120)  # 2 per second, burst 10
    run(_take_many(bucket, 10))
    clock.now += 2.0  # four tokens back
    run(_take_many(bucket, 4))
    assert clock.sleeps == []
    run(_take_many(bucket, 1))
    assert clock.sleeps == pytest.approx([0.5])


def test_bucket_never_above_capacity(clock: Clock) -> None:
    bucket = TokenBucket(60)
    clock.now += 3600
    run(_take_many(bucket, 5))
    assert clock.sleeps == []
    run(_take_many(bucket, 1))
    assert clock.sleeps == pytest.approx([1.0])


def test_bucket_large_request_goes_negative(clock: Clock) -> None:
    """A request larger than the burst is let through once the bucket is full, then later ones wait it off."""
    bucket = TokenBucket(60)
    run(bucket.take(50))
    assert clock.sleeps == []
    assert bucket.level == pytest.approx(-45.0)
    run(bucket.take(1))
    assert sum(clock.sleeps) == pytest.approx(46.0)


def test_bucket_charge(clock: Clock) -> None:
    bucket = TokenBucket(600)  # 10 per second, burst 50
    bucket.charge(70)
    assert bucket.level == pytest.approx(-20.0)
    run(bucket.take(1))
    assert sum(clock.sleeps) == pytest.approx(2.1)


# --------------------------------------------------------------------------- window


def test_window_aimd() -> None:
    lim = AgentLimits(8)
    assert lim.window == 8.0
    lim.on_failure("rate_limit")
    assert lim.window == 4.0
    lim.on_failure("timeout")
    assert lim.window == 2.0
    for _ in range(5):
        lim.on_failure("rate_limit")
    assert lim.window == 1.0  # never below one slot
    for kind in ("server_error", "connection", "bad_request", "context_length", "auth", "other"):
        lim.on_failure(kind)
    assert lim.window == 1.0  # only "too much" shrinks the window
    lim.on_success(10, 10)
    assert lim.window == 2.0  # +1/window
    lim.on_success(10, 10)
    assert lim.window == 2.5
    for _ in range(200):
        lim.on_success(1, 1)
    assert lim.window == 8.0  # capped at the configured slots


def test_window_non_throttle_failures_do_not_shrink() -> None:
    lim = AgentLimits(4)
    lim.on_failure("server_error")
    assert lim.window == 4.0


def test_on_success_charges_completion_tokens(clock: Clock) -> None:
    lim = AgentLimits(2, tokens_per_minute=600)
    before = lim.tokens.level
    lim.on_success(completion_tokens=30, prompt_tokens=999)
    assert lim.tokens.level == pytest.approx(before - 30)


def test_repr() -> None:
    lim = AgentLimits(4)
    assert repr(lim) == "AgentLimits(window=4.0/4, in_flight=0)"


# --------------------------------------------------------------------------- slots


async def _hold(lim: AgentLimits, active: list[int], peak: list[int], hold: asyncio.Event) -> None:
    async with lim.slot():
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await hold.wait()
        active[0] -= 1


def test_slot_limits_concurrency() -> None:
    async def main() -> tuple[int, int]:
        lim = AgentLimits(3)
        active, peak, hold = [0], [0], asyncio.Event()
        tasks = [asyncio.create_task(_hold(lim, active, peak, hold)) for _ in range(10)]
        for _ in range(20):
            await asyncio.sleep(0)
        in_flight = lim.in_flight
        hold.set()
        await asyncio.gather(*tasks)
        assert lim.in_flight == 0
        return in_flight, peak[0]

    in_flight, peak = run(main())
    assert in_flight == 3
    assert peak == 3


def test_slot_follows_shrunk_window() -> None:
    async def main() -> int:
        lim = AgentLimits(8)
        lim.on_failure("rate_limit")
        lim.on_failure("rate_limit")  # window 2
        active, peak, hold = [0], [0], asyncio.Event()
        tasks = [asyncio.create_task(_hold(lim, active, peak, hold)) for _ in range(6)]
        for _ in range(20):
            await asyncio.sleep(0)
        seen = lim.in_flight
        hold.set()
        await asyncio.gather(*tasks)
        return seen

    assert run(main()) == 2


def test_slot_released_on_error() -> None:
    async def main() -> int:
        lim = AgentLimits(1)
        with pytest.raises(RuntimeError):
            async with lim.slot():
                raise RuntimeError("request blew up")
        async with lim.slot():  # would hang if the slot had leaked
            pass
        return lim.in_flight

    assert run(asyncio.wait_for(main(), 5)) == 0


def test_condition_created_lazily() -> None:
    """Built outside any event loop (in the worker's setup); the condition appears on first use inside the loop."""
    lim = AgentLimits(1)
    assert lim._cond is None

    async def use() -> None:
        async with lim.slot():
            assert lim.in_flight == 1

    run(use())
    assert lim._cond is not None
    assert lim.in_flight == 0


# --------------------------------------------------------------------------- admit


def test_admit_requests_and_tokens(clock: Clock) -> None:
    lim = AgentLimits(4, requests_per_minute=60, tokens_per_minute=600)
    prompt = {"messages": [{"role": "user", "content": "x" * 400}]}  # ~100 tokens
    run(lim.admit(prompt))
    assert clock.sleeps == []
    assert lim.requests.level == pytest.approx(4.0)
    assert lim.tokens.level == pytest.approx(50.0 - 100.0)


def test_admit_tokens_min_one(clock: Clock) -> None:
    lim = AgentLimits(4, tokens_per_minute=600)
    run(lim.admit({"messages": [{"role": "user", "content": "hi"}]}))
    assert lim.tokens.level == pytest.approx(49.0)
    run(lim.admit({}))
    assert lim.tokens.level == pytest.approx(48.0)


def test_admit_unlimited(clock: Clock) -> None:
    lim = AgentLimits(4)
    for _ in range(100):
        run(lim.admit({"messages": [{"role": "user", "content": "x" * 10_000}]}))
    assert clock.sleeps == []


def test_admit_waits_for_request_budget(clock: Clock) -> None:
    lim = AgentLimits(4, requests_per_minute=30)  # one per 2 s, burst 2.5
    for _ in range(4):
        run(lim.admit({"messages": []}))
    assert sum(clock.sleeps) > 0


# --------------------------------------------------------------------------- server queue metrics


def metrics_client(handler: Callable[[httpx.Request], httpx.Response], seen: list[str] | None = None) -> httpx.AsyncClient:
    def wrapped(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(str(request.url))
        return handler(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(wrapped))


async def _waiting(handler: Callable[[httpx.Request], httpx.Response], endpoint: str, seen: list[str] | None = None) -> int:
    async with metrics_client(handler, seen) as client:
        return await _server_waiting(client, endpoint)


VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_running{model_name="m"} 4.0
vllm:num_requests_waiting{model_name="m"} 3.0
"""
LLAMACPP = """# HELP llamacpp:requests_processing Number of requests processing.
llamacpp:requests_processing 2
llamacpp:requests_deferred 5
"""


def test_server_waiting_vllm() -> None:
    seen: list[str] = []
    assert run(_waiting(lambda r: httpx.Response(200, text=VLLM), "http://vllm:8000/v1", seen)) == 3
    assert seen == ["http://vllm:8000/metrics"]


def test_server_waiting_llamacpp_and_sums() -> None:
    assert run(_waiting(lambda r: httpx.Response(200, text=LLAMACPP), "http://llama:8080/v1")) == 5
    both = VLLM + LLAMACPP + 'vllm:num_requests_waiting{model_name="n"} 1\n'
    assert run(_waiting(lambda r: httpx.Response(200, text=both), "http://both/v1")) == 9


def test_server_waiting_endpoint_without_v1() -> None:
    seen: list[str] = []
    run(_waiting(lambda r: httpx.Response(200, text=VLLM), "http://plain:1", seen))
    assert seen == ["http://plain:1/metrics"]


def test_server_waiting_ignores_garbage_values() -> None:
    text = 'vllm:num_requests_waiting\nvllm:num_requests_waiting{a="b"} lots\nllamacpp:requests_deferred 2\n'
    assert run(_waiting(lambda r: httpx.Response(200, text=text), "http://g/v1")) == 2


@pytest.mark.parametrize("status", [404, 405, 501])
def test_server_without_metrics_never_asked_again(status: int, clock: Clock) -> None:
    seen: list[str] = []
    endpoint = f"http://nometrics{status}/v1"
    assert run(_waiting(lambda r: httpx.Response(status, text="nope"), endpoint, seen)) == 0
    clock.now += 3600
    assert run(_waiting(lambda r: httpx.Response(200, text=VLLM), endpoint, seen)) == 0
    assert len(seen) == 1  # never asked again


def test_server_metrics_connection_error_is_retried_later(clock: Clock) -> None:
    seen: list[str] = []
    state = {"up": False}

    def flaky(request: httpx.Request) -> httpx.Response:
        if not state["up"]:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, text=VLLM)

    assert run(_waiting(flaky, "http://down/v1", seen)) == 0
    state["up"] = True
    assert run(_waiting(flaky, "http://down/v1", seen)) == 0  # within the back-off: not asked
    assert len(seen) == 1
    clock.now += limits_mod.METRICS_RETRY_S + 1
    assert run(_waiting(flaky, "http://down/v1", seen)) == 3  # asked again, and the queue is seen
    assert len(seen) == 2 and "http://down" not in limits_mod._NO_METRICS


def test_server_metrics_500_is_retried_later(clock: Clock) -> None:
    seen: list[str] = []
    assert run(_waiting(lambda r: httpx.Response(500, text="busy"), "http://busy/v1", seen)) == 0
    clock.now += limits_mod.METRICS_RETRY_S + 1
    assert run(_waiting(lambda r: httpx.Response(200, text=VLLM), "http://busy/v1", seen)) == 3


def test_server_metrics_timeout() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    assert run(_waiting(slow, "http://slow/v1")) == 0


class _Agent:
    endpoint = "http://q:8000/v1"


def test_least_loaded_estimate_from_the_servers_metrics(clock: Clock) -> None:
    """One slot busy and three waiting at a llama-server: a new request waits four rounds of its service time."""
    seen: list[str] = []
    state = {"running": 1, "waiting": 3}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/props":  # llama-server says how many slots it has
            return httpx.Response(200, json={"total_slots": 2})
        return httpx.Response(
            200, text=f"llamacpp:requests_processing {state['running']}\nllamacpp:requests_deferred {state['waiting']}\n"
        )

    async def main() -> None:
        lim = AgentLimits(4)
        lim.in_flight = 4
        async with metrics_client(handler, seen) as client:
            await lim.refresh_server_load(client, _Agent())
            assert lim.server_load is not None and (lim.server_load.running, lim.server_load.waiting) == (1, 3)
            assert lim.server_slots == 2 and seen[-1].endswith("/props")  # as the server says
            assert lim.expected_s() is None  # nothing answered yet: no estimate, the agent is tried
            lim.observe_latency(8.0, server_s=2.0)  # 8 s seen here, 2 s of them the server's own work
            assert lim.service_s == 2.0 and lim.latency_s == 8.0
            # behind 4 requests on 2 slots: 3 must finish first, one every second on average
            assert lim.requests_ahead() == 3 and lim.expected_s() == pytest.approx(2.0 * (1 + 3 / 2))
            lim.server_slots = 1
            assert lim.expected_s() == pytest.approx(2.0 * 5)  # 1 slot: four rounds, then its own
            lim.in_flight = 3  # one answered since the read: the estimate follows without a new read
            assert lim.server_requests() == 3 and lim.expected_s() == pytest.approx(2.0 * 4)
            await lim.refresh_server_load(client, _Agent())  # within METRICS_EVERY_S: not asked again
            assert len(seen) == 2
            clock.now += limits_mod.METRICS_EVERY_S
            state.update(running=1, waiting=0)
            await lim.refresh_server_load(client, _Agent())
            assert len(seen) == 3  # /props is asked once per server
            assert lim.server_requests() == 3 and lim.server_slots == 2

    run(main())


def test_slots_learnt_from_a_queue_without_props(clock: Clock) -> None:
    """vLLM-like metrics, no /props: once the server has a queue, what it runs is all it can."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="vllm:num_requests_running 3\nvllm:num_requests_waiting 2\n")

    async def main() -> None:
        lim = AgentLimits(8)
        async with metrics_client(handler) as client:
            await lim.refresh_server_load(client, _Agent())
        assert lim.server_slots == 3 and lim.slots_estimate() == 3

    run(main())


def test_least_loaded_estimate_without_metrics(clock: Clock) -> None:
    """No /metrics (the simulator, hosted APIs): the agent's own requests against its concurrency."""

    async def main() -> None:
        lim = AgentLimits(2)
        async with metrics_client(lambda r: httpx.Response(404)) as client:
            for _ in range(3):
                await lim.refresh_server_load(client, _Agent())
                clock.now += 2.0
        assert lim.server_load is None
        lim.observe_latency(1.5)  # no server timings: the answer time stands in
        assert lim.expected_s() == pytest.approx(1.5)
        lim.in_flight = 2
        assert lim.expected_s() == pytest.approx(1.5 * (1 + 1 / 2))  # both slots busy: one more waits for the first

    seen: list[str] = []
    run(main())
    assert clock.sleeps == [] and not seen


def _drain(path: str, count: int) -> None:
    import asyncio as _asyncio
    from pathlib import Path as _Path

    from parsl_chat.core.limits import SharedTokenBucket

    bucket = SharedTokenBucket(120, _Path(path))  # 2 per second, burst of 10

    async def go() -> None:
        for _ in range(count):
            await bucket.take(1)

    _asyncio.run(go())


def test_shared_bucket_is_one_budget_for_all_processes_of_a_node(tmp_path) -> None:
    import multiprocessing
    import time as _time

    path = str(tmp_path / "requests.bucket")
    started = _time.monotonic()
    procs = [multiprocessing.get_context("spawn").Process(target=_drain, args=(path, 8)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    elapsed = _time.monotonic() - started
    assert all(p.exitcode == 0 for p in procs)
    # 16 requests against a burst of 10 and 2/s: the 6 beyond the burst need >= 3 s in total.
    # Two private buckets would have let all 16 through at once.
    assert elapsed >= 2.5
