"""The simulated endpoint as an aiohttp application: routes, per-request outcomes, metrics, and serving it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from aiohttp import web

from ..errors import ServerError
from .faults import NOT_JSON, FaultPlan, Outcome, draw_outcome, extra_latency_ms, spoilt
from .sim_answers import answer_response, dumps, message_text

__all__ = ["DEFAULT_LOG_LIMIT", "make_app", "run_server"]

#: In-memory request log bound: a long load test must not eat the node's memory.
#: ``log_path`` keeps every line.
DEFAULT_LOG_LIMIT = 200_000

_HANG_POLL_S = 0.05
_PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error shaped like OpenAI's, so clients' error parsing is exercised for real."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=dumps(body), content_type="application/json", headers=headers)


def _retry_after_headers(seconds: float) -> dict[str, str]:
    # Whole seconds are sent as HTTP says; fractions are kept (openai-python and most
    # clients parse a float) so retry tests need not sleep a whole second.
    value = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
    return {"Retry-After": value, "retry-after-ms": str(round(seconds * 1000))}


def _prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class _Call:
    """One chat request past parsing: what its outcome and answer need."""

    t: float
    number: int
    body: dict[str, Any]
    messages: list[dict[str, Any]]
    prompt: str
    model: str
    attempt: int

    @property
    def max_tokens(self) -> Any:
        value = self.body.get("max_completion_tokens")  # the newer name wins, as with OpenAI
        return self.body.get("max_tokens") if value is None else value


async def _parse_request(request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]] | web.Response:
    """(body, messages), or the 400 a malformed request gets."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "The request body is not valid JSON.", "invalid_request_error")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return _error(400, "'messages' must be a non-empty list of message objects.", "invalid_request_error", param="messages")
    return body, messages


def _invalid_max_tokens(max_tokens: Any) -> web.Response | None:
    if max_tokens is None or (not isinstance(max_tokens, bool) and isinstance(max_tokens, int) and max_tokens >= 1):
        return None
    return _error(400, f"max_tokens must be a positive integer, got {max_tokens!r}.", "invalid_request_error", param="max_tokens")


def _refusal(prompt: str) -> web.Response | None:
    """The 401/400 a marker asks for: answered on arrival, as validation in front of a model is."""
    if "__auth__" in prompt:
        return _error(401, "Incorrect API key provided (simulated).", "invalid_request_error", "invalid_api_key")
    if "__bad_request__" in prompt:
        return _error(400, "Bad request (simulated).", "invalid_request_error")
    if "__context_length__" in prompt:
        return _error(
            400,
            "This model's maximum context length is exceeded (simulated).",
            "invalid_request_error",
            "context_length_exceeded",
            param="messages",
        )
    return None


class _Simulator:
    """State shared by the handlers of one app: RNG, counters, slots, request log."""

    def __init__(self, plan: FaultPlan, log_path: str | os.PathLike[str] | None, log_limit: int) -> None:
        self.plan = plan
        self.log_path = log_path
        self.rng = random.Random(plan.seed)
        # Keyed by hash(prompt): a million distinct prompts must not be kept twice.
        self.attempts: dict[int, int] = {}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=log_limit or None)
        # Opened here, not at startup, so an unwritable path fails before we listen.
        # Line-buffered so another process can read each request as it happens.
        self.log_file: IO[str] | None = (
            open(log_path, "a", encoding="utf-8", buffering=1) if log_path is not None else None  # noqa: SIM115
        )
        self.slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
        self.processing = 0
        self.deferred = 0
        self.total = 0
        self.by_status: collections.Counter[str] = collections.Counter()
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.closing = False
        self.id_prefix = f"chatcmpl-sim{random.getrandbits(32):08x}"

    # ---- lifecycle

    async def on_shutdown(self, app: web.Application) -> None:
        # Runs before aiohttp waits for handlers: hung requests must let go now.
        self.closing = True

    async def on_cleanup(self, app: web.Application) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    # ---- bookkeeping

    def record(self, t: float, prompt: str | None, model: str | None, status: int | str, attempt: int) -> None:
        entry = {"t": t, "prompt": prompt, "model": model, "status": status, "attempt": attempt}
        self.log.append(entry)
        self.by_status[str(status)] += 1
        if self.log_file is not None:
            self.log_file.write(json.dumps(entry) + "\n")
            self.log_file.flush()

    # ---- routes

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.plan.model, "object": "model", "created": 0, "owned_by": "parsl-chat"}
        return web.json_response({"object": "list", "data": [model]})

    async def requests(self, request: web.Request) -> web.Response:
        return web.Response(body=dumps(list(self.log)), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        label = f'{{model_name="{_prom_label(self.plan.model)}"}}'
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("llamacpp:requests_processing", "gauge", "Number of requests processing.", [("", self.processing)])
        metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", [("", self.deferred)])
        metric(
            "llamacpp:prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            [("", self.prompt_tokens_total)],
        )
        metric(
            "llamacpp:tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            [("", self.completion_tokens_total)],
        )
        metric("vllm:num_requests_running", "gauge", "Number of requests currently running.", [(label, self.processing)])
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [(label, self.deferred)],
        )
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            [(label, self.prompt_tokens_total)],
        )
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            [(label, self.completion_tokens_total)],
        )
        metric("simulated_requests_total", "counter", "Chat completion requests received.", [("", self.total)])
        metric(
            "simulated_responses_total",
            "counter",
            "Chat completion outcomes by status.",
            [(f'{{status="{_prom_label(s)}"}}', n) for s, n in sorted(self.by_status.items())],
        )
        return web.Response(body=("\n".join(lines) + "\n").encode(), headers={"Content-Type": _PROM_CONTENT_TYPE})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t = time.time()
        self.total += 1
        number = self.total  # taken now: other requests arrive while this one sleeps
        # Always two draws per request, whatever happens to it: with a seed, the
        # n-th request gets the same fate in every run.
        u_fault, u_jitter = self.rng.random(), self.rng.random()
        parsed = await _parse_request(request)
        if isinstance(parsed, web.Response):
            self.record(t, None, None, 400, 0)
            return parsed
        body, messages = parsed
        model = body.get("model") or self.plan.model
        prompt = next((message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        key = hash(prompt)
        attempt = self.attempts.get(key, 0) + 1
        self.attempts[key] = attempt
        call = _Call(t, number, body, messages, prompt, model if isinstance(model, str) else str(model), attempt)
        outcome = draw_outcome(self.plan, prompt, attempt, u_fault)
        # Validation and rate limiting answer on arrival: no slot, no latency.
        refusal = _invalid_max_tokens(call.max_tokens) or _refusal(prompt)
        if refusal is None and outcome == 429:
            refusal = _error(
                429,
                "Rate limit reached (simulated).",
                "requests",
                "rate_limit_exceeded",
                headers=_retry_after_headers(self.plan.retry_after_s),
            )
        if refusal is not None:
            self.record(t, prompt, call.model, refusal.status, attempt)
            return refusal
        delay_ms = self.plan.latency_ms + u_jitter * self.plan.jitter_ms + extra_latency_ms(prompt)
        return await self._in_slot(request, call, outcome, delay_ms)

    async def _in_slot(self, request: web.Request, call: _Call, outcome: Outcome, delay_ms: float) -> web.StreamResponse:
        """Wait for a slot, sleep the latency, then let ``outcome`` happen."""
        if self.slots is not None:
            self.deferred += 1
            try:
                await self.slots.acquire()
            finally:
                self.deferred -= 1
        self.processing += 1
        try:
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000.0)
            self.record(call.t, call.prompt, call.model, 200 if outcome == "invalid" else outcome, call.attempt)
            if outcome == 500:
                return _error(500, "The server had an error while processing your request (simulated).", "server_error")
            if outcome == "hang":
                return await self._hang(request)
            if outcome == "drop":
                return self._abort(request)
            spoil = spoilt(call.prompt, call.attempt) or (NOT_JSON if outcome == "invalid" else None)
            return self._answer(call, spoil)
        finally:
            self.processing -= 1
            if self.slots is not None:
                self.slots.release()

    # ---- outcomes

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        # Polling, not cancellation: make_app's user may run aiohttp without
        # handler_cancellation, and we must still notice the client leaving.
        while not self.closing:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(_HANG_POLL_S)
        return self._abort(request)

    @staticmethod
    def _abort(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        # Never sent: aiohttp's write fails on the aborted transport and it drops it quietly.
        return web.Response(status=500)

    def _answer(self, call: _Call, spoil: str | None) -> web.Response:
        cid = f"{self.id_prefix}{call.number:x}"
        response, prompt_tokens, completion_tokens = answer_response(
            self.plan, cid, call.body, call.messages, call.prompt, call.model, call.max_tokens, spoil
        )
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        return response


_SIM_KEY = web.AppKey("parsl_chat_simulator", _Simulator)


def make_app(
    plan: FaultPlan, log_path: str | os.PathLike[str] | None = None, *, log_limit: int = DEFAULT_LOG_LIMIT
) -> web.Application:
    """The simulated endpoint as an aiohttp application (routes under ``/v1`` plus probes).

    ``log_limit`` bounds the in-memory request log (0 = unbounded); ``log_path`` gets every request.
    """
    sim = _Simulator(plan, log_path, log_limit)
    # Long-context prompts are legitimate load; aiohttp's 1 MiB default would 413 them.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_SIM_KEY] = sim
    app.on_shutdown.append(sim.on_shutdown)
    app.on_cleanup.append(sim.on_cleanup)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/chat/completions", sim.chat)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/v1/health", sim.health)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_get("/_requests", sim.requests)
    return app


def _base_url(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # a wildcard is no address a client can use
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


async def _serve(
    plan: FaultPlan, host: str, port: int, log_path: str | os.PathLike[str] | None, ready: Callable[[str], None] | None
) -> None:
    try:
        app = make_app(plan, log_path)
    except OSError as exc:
        raise ServerError(f"cannot open the request log {os.fspath(log_path or '')!r}: {exc}") from exc
    # Access log off: it would cost more than answering at zero latency.
    # handler_cancellation: a client that gives up frees its slot at once, as in llama.cpp.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only (POSIX)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:  # port taken, unknown host: a user error, not a traceback
            raise ServerError(
                f"cannot listen on {host}:{port}: {exc}", hint="choose another --port, or 0 for a free one"
            ) from exc
        bound_port = runner.addresses[0][1] if runner.addresses else port
        if ready is not None:
            ready(_base_url(host, bound_port))
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_server(
    plan: FaultPlan,
    host: str = "127.0.0.1",
    port: int = 0,
    log_path: str | os.PathLike[str] | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``plan`` until SIGINT/SIGTERM; ``ready(base_url)`` is called once listening.

    ``port=0`` picks a free port. Signals are only handled from the main thread.
    Raises :class:`ServerError` if it cannot listen or open ``log_path``.
    """
    asyncio.run(_serve(plan, host, port, log_path, ready))
