"""A simulated OpenAI-compatible chat endpoint with failure injection.

Used by our tests and benchmarks, and by users (``parsl-chat serve --simulate``)
to load-test a cluster setup without a GPU. It is never a product default.

Answers are deterministic (``"sim " + first 8 words of the last user message``,
padded with ``tok`` words), so a test can tell which prompt an answer belongs to.
Faults come from a :class:`FaultPlan` (rates, latency, slots) or from magic
markers in the last user message, which win over every rate:

``__bad_request__`` 400, ``__context_length__`` 400 ``context_length_exceeded``,
``__auth__`` 401, ``__server_error__`` 500, ``__hang__`` never answers,
``__slow_<ms>__`` adds that much latency.

Where each outcome happens, chosen to look like a real server:

* 400/401 and 429 are answered on arrival, without latency and without a slot:
  validation and rate limiting sit in front of the model.
* Everything else (success, 500, hang, drop) waits for a slot when
  ``max_concurrency`` is set, then sleeps the latency, then happens.  A hung
  request keeps its slot until its client gives up, like a stuck llama.cpp slot.

Run it as ``python -m parsl_chat.testing --latency-ms 50`` or, from Python, with
:class:`SimulatedServer` (a subprocess, so load tests don't share our GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import faulthandler
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from aiohttp import web

from .errors import ServerError

__all__ = [
    "READY_PREFIX",
    "FaultPlan",
    "SimulatedServer",
    "main",
    "make_app",
    "run_server",
]

#: The one line ``main`` prints (followed by the base URL) once it is listening.
READY_PREFIX = "parsl-chat simulated endpoint: "

#: In-memory request log bound: a long load test must not eat the node's memory.
#: ``log_path`` keeps every line.
DEFAULT_LOG_LIMIT = 200_000

_ANSWER_PROMPT_WORDS = 8
_HANG_POLL_S = 0.05
_SLOW_RE = re.compile(r"__slow_(\d+(?:\.\d+)?)__")
_PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class FaultPlan:
    """What the simulated endpoint does to each request."""

    latency_ms: float = 0.0  # fixed delay before answering each request
    jitter_ms: float = 0.0  # uniform extra delay in [0, jitter_ms]
    rate_500: float = 0.0  # fraction of requests answered 500
    rate_429: float = 0.0  # fraction answered 429 with a Retry-After header
    retry_after_s: float = 1.0
    rate_hang: float = 0.0  # fraction that never answer (until the client gives up)
    rate_drop: float = 0.0  # fraction whose connection is closed without a response
    completion_tokens: int = 16  # words in each answer
    max_concurrency: int = 0  # 0 = unlimited; else N slots, others queue
    model: str = "simulated"
    seed: int | None = None  # deterministic fault draws when set
    fail_first_attempts: int = 0  # each distinct prompt: 500 on its first N attempts

    def __post_init__(self) -> None:
        # Fail at construction, not at the first request in the middle of a run.
        for name in ("latency_ms", "jitter_ms", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rates = ("rate_500", "rate_429", "rate_hang", "rate_drop")
        for name in rates:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        total = sum(getattr(self, name) for name in rates)
        if total > 1.0 + 1e-9:
            raise ValueError(f"{' + '.join(rates)} must not exceed 1, got {total:g}")
        if self.completion_tokens < 1:
            raise ValueError(f"completion_tokens must be >= 1, got {self.completion_tokens}")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0, got {self.max_concurrency}")
        if self.fail_first_attempts < 0:
            raise ValueError(f"fail_first_attempts must be >= 0, got {self.fail_first_attempts}")
        if not self.model:
            raise ValueError("model must not be empty")


# --------------------------------------------------------------------------- server


def _message_text(content: Any) -> str:
    """Text of a message ``content``: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


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
    return web.Response(status=status, body=_dumps(body), content_type="application/json", headers=headers)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _retry_after_headers(seconds: float) -> dict[str, str]:
    # Whole seconds are sent as HTTP says; fractions are kept (openai-python and most
    # clients parse a float) so retry tests need not sleep a whole second.
    value = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
    return {"Retry-After": value, "retry-after-ms": str(round(seconds * 1000))}


def _prom_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        return web.Response(body=_dumps(list(self.log)), content_type="application/json")

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
        plan = self.plan
        # Always two draws per request, whatever happens to it: with a seed, the
        # n-th request gets the same fate in every run.
        u_fault, u_jitter = self.rng.random(), self.rng.random()

        try:
            body = json.loads(await request.read())
        except ValueError:
            self.record(t, None, None, 400, 0)
            return _error(400, "The request body is not valid JSON.", "invalid_request_error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            self.record(t, None, None, 400, 0)
            return _error(
                400,
                "'messages' must be a non-empty list of message objects.",
                "invalid_request_error",
                param="messages",
            )

        model = body.get("model") or plan.model
        model = model if isinstance(model, str) else str(model)
        prompt = next((_message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        key = hash(prompt)
        attempt = self.attempts.get(key, 0) + 1
        self.attempts[key] = attempt

        def reject(status: int, response: web.Response) -> web.Response:
            self.record(t, prompt, model, status, attempt)
            return response

        max_tokens = body.get("max_completion_tokens")  # the newer name wins, as with OpenAI
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            return reject(
                400,
                _error(
                    400,
                    f"max_tokens must be a positive integer, got {max_tokens!r}.",
                    "invalid_request_error",
                    param="max_tokens",
                ),
            )

        # Validation and rate limiting answer on arrival: no slot, no latency.
        if "__auth__" in prompt:
            return reject(401, _error(401, "Incorrect API key provided (simulated).", "invalid_request_error", "invalid_api_key"))
        if "__bad_request__" in prompt:
            return reject(400, _error(400, "Bad request (simulated).", "invalid_request_error"))
        if "__context_length__" in prompt:
            return reject(
                400,
                _error(
                    400,
                    "This model's maximum context length is exceeded (simulated).",
                    "invalid_request_error",
                    "context_length_exceeded",
                    param="messages",
                ),
            )

        outcome: int | str
        if "__server_error__" in prompt:
            outcome = 500
        elif "__hang__" in prompt:
            outcome = "hang"
        elif attempt <= plan.fail_first_attempts:
            outcome = 500
        else:
            outcome = 200
            edge = 0.0
            for rate, fate in (
                (plan.rate_500, 500),
                (plan.rate_429, 429),
                (plan.rate_hang, "hang"),
                (plan.rate_drop, "drop"),
            ):
                edge += rate
                if u_fault < edge:
                    outcome = fate
                    break
        if outcome == 429:
            return reject(
                429,
                _error(
                    429,
                    "Rate limit reached (simulated).",
                    "requests",
                    "rate_limit_exceeded",
                    headers=_retry_after_headers(plan.retry_after_s),
                ),
            )

        delay_ms = plan.latency_ms + u_jitter * plan.jitter_ms
        slow = _SLOW_RE.search(prompt)
        if slow:
            delay_ms += float(slow.group(1))

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
            if outcome == 500:
                return reject(
                    500,
                    _error(500, "The server had an error while processing your request (simulated).", "server_error"),
                )
            if outcome == "hang":
                self.record(t, prompt, model, "hang", attempt)
                return await self._hang(request)
            if outcome == "drop":
                self.record(t, prompt, model, "drop", attempt)
                return self._abort(request)
            self.record(t, prompt, model, 200, attempt)
            return self._answer(number, body, messages, prompt, model, max_tokens)
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

    def _answer(
        self,
        number: int,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        prompt: str,
        model: str,
        max_tokens: int | None,
    ) -> web.Response:
        plan = self.plan
        words = ["sim", *prompt.split()[:_ANSWER_PROMPT_WORDS]] + ["tok"] * plan.completion_tokens
        words = words[: plan.completion_tokens]
        finish_reason = "stop"
        if max_tokens is not None and max_tokens < plan.completion_tokens:
            words = words[:max_tokens]
            finish_reason = "length"
        prompt_tokens = sum(len(_message_text(m.get("content")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += len(words)
        cid = f"{self.id_prefix}{number:x}"
        created = int(time.time())

        if not body.get("stream"):
            return web.Response(
                body=_dumps(
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "system_fingerprint": "fp_simulated",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": " ".join(words)},
                                "logprobs": None,
                                "finish_reason": finish_reason,
                            }
                        ],
                        "usage": usage,
                    }
                ),
                content_type="application/json",
            )

        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        head: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_simulated",
        }
        if include_usage:
            head["usage"] = None  # as OpenAI: null on every chunk but the last

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + _dumps({**head, "choices": [choice]}) + b"\n\n"

        parts = [chunk({"role": "assistant", "content": ""})]
        parts += [chunk({"content": word if i == 0 else " " + word}) for i, word in enumerate(words)]
        parts.append(chunk({}, finish_reason))
        if include_usage:
            parts.append(b"data: " + _dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        parts.append(b"data: [DONE]\n\n")
        # No per-token delay is simulated, so one write is as good as many and cheaper.
        return web.Response(body=b"".join(parts), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


# --------------------------------------------------------------------------- subprocess


def _plan_argv(plan: FaultPlan) -> list[str]:
    argv: list[str] = []
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if value is None:
            continue
        argv += ["--" + f.name.replace("_", "-"), repr(value) if isinstance(value, float) else str(value)]
    return argv


def _contents(file: IO[bytes]) -> bytes:
    """All of a file the child writes to, read without moving the offset it shares with the child.

    seek(0) + read() would move that offset: print() writes a line and its newline
    separately, and a seek between the two put the newline over the line's first
    byte, so the ready line was never seen (CI, twice).
    """
    return os.pread(file.fileno(), os.fstat(file.fileno()).st_size, 0)


def _process_state(pid: int) -> str:
    """The kernel's view of a process (``State`` and where it sleeps), for a start-up that hangs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return "state unknown"
    state = next((line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("State:")), "?")
    return f"state {state}, waiting in {wchan}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data: bytes = response.read()
        return data


class SimulatedServer:
    """The simulated endpoint in a child process (``python -m parsl_chat.testing``).

    A subprocess, so a load test's client and the server don't share one GIL::

        with SimulatedServer(FaultPlan(latency_ms=20)) as server:
            client = openai.OpenAI(base_url=server.url, api_key="x")
    """

    def __init__(
        self,
        plan: FaultPlan | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 15.0,
    ) -> None:
        self.plan = plan if plan is not None else FaultPlan()
        self.log_path = log_path
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._url: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._final_log: list[dict[str, Any]] | None = None
        self._health_error = "not asked yet"

    @property
    def url(self) -> str:
        """Base URL ending in ``/v1``, for an OpenAI client's ``base_url``."""
        if self._url is None:
            raise ServerError("the simulated server is not running; call start() first")
        return self._url

    @property
    def root_url(self) -> str:
        return self.url[: -len("/v1")]

    def argv(self) -> list[str]:
        """The child's command line."""
        argv = [
            sys.executable,
            "-m",
            "parsl_chat.testing",
            *_plan_argv(self.plan),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.log_path is not None:
            argv += ["--log-path", os.fspath(self.log_path)]
        return argv

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        # A source checkout must be importable from any cwd; an installed package already is
        # (and putting site-packages on PYTHONPATH would let it shadow the stdlib).
        if Path(root).name not in ("site-packages", "dist-packages"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def start(self) -> Self:
        """Start the child and wait (bounded) until it listens and ``/health`` answers."""
        if self._proc is not None:
            raise ServerError("the simulated server is already running")
        self._final_log = None
        # Files, not pipes: a chatty child can never block on a full pipe nobody reads.
        self._stdout = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr, env=self._env()
        )
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while (url := self._ready_url()) is None:
                self._check_alive_until(deadline, "it printed no ready line")
                time.sleep(0.02)
            self._url = url
            while not self._healthy():
                self._check_alive_until(deadline, f"{self.root_url}/health did not answer ok ({self._health_error})")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_url(self) -> str | None:
        assert self._stdout is not None
        for line in _contents(self._stdout).decode(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
        return None

    def _healthy(self) -> bool:
        try:
            answer = json.loads(_http_get(self.root_url + "/health", 2.0))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._health_error = f"{type(exc).__name__}: {exc}"
            return False
        self._health_error = f"answered {answer!r}"
        return isinstance(answer, dict) and answer.get("status") == "ok"

    def _check_alive_until(self, deadline: float, waiting_for: str) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise ServerError(
                f"the simulated server exited with code {code} before it was ready{self._stderr_tail()}",
                hint="check the FaultPlan and the host/port",
            )
        if time.monotonic() > deadline:
            state = _process_state(self._proc.pid)
            # The child dumps its Python stacks on SIGUSR1 (faulthandler): show where it is stuck.
            self._proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            raise ServerError(
                f"the simulated server (pid {self._proc.pid}, {state}) was not ready after "
                f"{self.startup_timeout_s:g} s: {waiting_for}{self._stderr_tail(6000)}"
            )

    def _stderr_tail(self, max_chars: int = 2000) -> str:
        if self._stderr is None:
            return ""
        tail = _contents(self._stderr).decode(errors="replace")[-max_chars:].strip()
        return f":\n{tail}" if tail else ""

    def requests(self) -> list[dict[str, Any]]:
        """The request log: live from ``/_requests``, else from ``log_path``, else as it was at stop()."""
        if self._url is not None and self._proc is not None and self._proc.poll() is None:
            try:
                data: list[dict[str, Any]] = json.loads(_http_get(self.root_url + "/_requests", 10.0))
                return data
            except (OSError, http.client.HTTPException, ValueError):
                pass  # gone meanwhile: fall back below
        if self.log_path is not None and os.path.exists(self.log_path):
            with open(self.log_path, encoding="utf-8") as f:
                # The last line may be half-written if the server was killed mid-write.
                return [json.loads(line) for line in f if line.endswith("\n")]
        if self._final_log is not None:
            return list(self._final_log)
        raise ServerError("the simulated server is not running and has no log_path to read requests from")

    def stop(self) -> None:
        """SIGTERM, then kill after 5 s. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if self.log_path is None and self._url is not None:
                try:  # keep the log readable after stop() when there is no file
                    self._final_log = json.loads(_http_get(self.root_url + "/_requests", 2.0))
                except (OSError, http.client.HTTPException, ValueError):
                    pass
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for f in (self._stdout, self._stderr):
            if f is not None:
                f.close()
        self._stdout = self._stderr = None
        self._url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatedServer(url={self._url!r}, plan={self.plan!r})"


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parsl_chat.testing",
        description="Simulated OpenAI-compatible chat endpoint with failure injection.",
    )
    d = FaultPlan()
    p.add_argument("--latency-ms", type=float, default=d.latency_ms, help="fixed delay per request")
    p.add_argument("--jitter-ms", type=float, default=d.jitter_ms, help="uniform extra delay in [0, N]")
    p.add_argument("--rate-500", type=float, default=d.rate_500, help="fraction answered 500")
    p.add_argument("--rate-429", type=float, default=d.rate_429, help="fraction answered 429 with Retry-After")
    p.add_argument("--retry-after-s", type=float, default=d.retry_after_s, help="Retry-After of a 429")
    p.add_argument("--rate-hang", type=float, default=d.rate_hang, help="fraction never answered")
    p.add_argument("--rate-drop", type=float, default=d.rate_drop, help="fraction whose connection is dropped")
    p.add_argument("--completion-tokens", type=int, default=d.completion_tokens, help="words per answer")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="slots; 0 = unlimited")
    p.add_argument("--model", default=d.model, help="model name served")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for deterministic fault draws")
    p.add_argument(
        "--fail-first-attempts",
        type=int,
        default=d.fail_first_attempts,
        help="500 on the first N attempts of each distinct prompt",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    p.add_argument("--log-path", default=None, help="append every request here as a JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; prints one ``READY_PREFIX + base_url`` line when listening."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    fields = {f.name for f in dataclasses.fields(FaultPlan)}
    try:
        plan = FaultPlan(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))

    # SimulatedServer asks for the stacks of a child that never gets ready
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def ready(url: str) -> None:
        print(READY_PREFIX + url, flush=True)

    try:
        run_server(plan, args.host, args.port, args.log_path, ready)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
