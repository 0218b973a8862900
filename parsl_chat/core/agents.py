"""Chat agents: a system prompt, a model and an OpenAI-compatible endpoint.

:class:`AgentSpec` is the resolved, picklable description that travels to
workers; :func:`chat_completion` sends one request with retries, backoff and
failure classification, and never raises for a failed request: the failure
becomes part of the returned :class:`Outcome`, so one bad prompt never fails
its chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx

from ..config import AgentConfig, RunConfig, Secret, Settings
from .llama_build import embedded_slots_share

__all__ = [
    "ERROR_TYPES",
    "TRANSIENT",
    "UNFINISHED",
    "AgentSpec",
    "Outcome",
    "Recovery",
    "RequestFailure",
    "chat_completion",
    "classify_status",
    "resolve_agents",
    "stream_chat",
]

ERROR_TYPES = (
    "rate_limit",
    "server_error",
    "timeout",
    "connection",
    "bad_request",
    "context_length",
    "auth",
    "invalid_input",
    "invalid_output",  # answers that never matched their JSON Schema (parsl_chat.core.structured)
    "interrupted",
    "other",
)
#: failures worth another attempt; the rest fail the prompt at once
TRANSIENT = frozenset({"rate_limit", "server_error", "timeout", "connection"})
#: an outcome that is not final: the run's own transition (a stop, a drain, a model server
#: that is down) cut the prompt short, so it goes back to the queue or to the next --resume
UNFINISHED = "unfinished"

#: ``recover``'s answer after a connection failure: the endpoint was down and is back
#: (try again, the attempt does not count), it is up (an ordinary failure), or it is gone
Recovery = Literal["back", "up", "gone"]


@dataclass(frozen=True)
class AgentSpec:
    """An agent with every value resolved (no defaults left to look up)."""

    name: str
    system_prompt: str
    model: str
    endpoint: str  # base URL ending in /v1
    api_key: Secret | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    concurrency: int = 4
    concurrency_given: bool = True  # set by the user (not our default, nor the embedded server's share)

    def __repr__(self) -> str:
        return f"AgentSpec(name={self.name!r}, model={self.model!r}, endpoint={self.endpoint!r}, concurrency={self.concurrency})"

    def describe(self) -> dict[str, Any]:
        """Public description (no key) for run.json, plans and reports."""
        return {
            "name": self.name,
            "model": self.model,
            "endpoint": self.endpoint,
            "concurrency": self.concurrency,
            "weight": self.weight,
        }


def resolve_agents(
    settings: Settings,
    endpoint: str,
    model: str,
    api_key: Secret | None,
    servers: tuple[int, int | None] = (1, None),
) -> list[AgentSpec]:
    """The fleet for a run: configured agents (cycled or trimmed to the agent count).

    ``endpoint``/``model``/``api_key`` fill in what an agent does not set itself
    (the run-wide value, or the embedded server's).
    """
    run: RunConfig = settings.run
    configured = list(run.agents) or [AgentConfig(name="agent")]
    explicit_count = settings.source_of("agent_count").kind != "default"
    count = run.agent_count if explicit_count or not run.agents else len(run.agents)
    # agents with no endpoint of their own share the embedded server: by default they fill its slots
    on_server = 0 if run.endpoint else sum(1 for i in range(count) if not configured[i % len(configured)].endpoint)
    share = embedded_slots_share(settings, on_server, servers) if on_server else None
    concurrency_set = settings.source_of("limits.concurrency").kind != "default"
    specs = []
    for i in range(count):
        base = configured[i % len(configured)]
        lap = i // len(configured)
        name = base.name if lap == 0 else f"{base.name}-{lap + 1}"
        specs.append(
            AgentSpec(
                name=name,
                system_prompt=base.system_prompt,
                model=base.model or model,
                endpoint=_normalise_endpoint(base.endpoint or endpoint),
                api_key=base.api_key or api_key,
                params=_with_schema(base, run),
                weight=base.weight,
                concurrency=base.concurrency or (share if share and not base.endpoint else run.limits.concurrency),
                concurrency_given=base.concurrency is not None or concurrency_set,
            )
        )
    return specs


def _with_schema(agent: AgentConfig, run: RunConfig) -> dict[str, Any]:
    """The agent's params, with the response_format of its schema file (or else the run's) when it names none."""
    params = dict(agent.params)
    schema_file = agent.schema or run.schema
    if schema_file is not None and "response_format" not in params:
        from .structured import load_schema_file

        params["response_format"] = load_schema_file(Path(schema_file), schema_file)
    return params


def _normalise_endpoint(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    return url


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What became of one request after all its attempts."""

    status: str  # ok | error | unfinished (see UNFINISHED)
    attempts: int
    started_at: float | None
    finished_at: float | None
    response: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    error_type: str | None = None
    error: str | None = None
    parsed: str | None = None  # a structured answer, validated, as JSON text
    #: the server's own time for this answer, from llama-server's per-response ``timings``:
    #: reading the prompt (prompt_ms) and generating (predicted_ms); None from servers without them
    server_prompt_s: float | None = None
    server_generation_s: float | None = None

    @property
    def server_s(self) -> float | None:
        """The server's time on this request (prompt + generation), without its wait for a slot."""
        if self.server_prompt_s is None and self.server_generation_s is None:
            return None
        return (self.server_prompt_s or 0.0) + (self.server_generation_s or 0.0)


def _timing_s(timings: Any, key: str) -> float | None:
    """One of llama-server's per-response ``timings`` (milliseconds) in seconds; None if absent or odd."""
    if not isinstance(timings, dict):
        return None
    value = timings.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        return None
    return round(value / 1000.0, 6)


class RequestFailure(Exception):
    """One failed attempt, classified."""

    def __init__(self, error_type: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.retry_after_s = retry_after_s


#: how servers say a prompt is too long: OpenAI and vLLM, llama-cpp-python ("exceed context
#: window"), llama.cpp's llama-server ("exceeds the available context size")
_CONTEXT_WORDS = ("context_length", "context length", "maximum context", "context window", "context size")


def classify_status(status: int, body: str) -> str:
    if status == 429:
        return "rate_limit"
    if status >= 500:
        return "server_error"
    if status in (401, 403):
        return "auth"
    if status == 408:
        return "timeout"
    lowered = body.lower()
    if status == 413 or any(words in lowered for words in _CONTEXT_WORDS):  # 413: a proxy refused the body's size
        return "context_length"
    if 400 <= status < 500:
        return "bad_request"
    return "other"


def _headers(agent: AgentSpec) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if agent.api_key is not None and agent.api_key.reveal():
        headers["Authorization"] = f"Bearer {agent.api_key.reveal()}"
    return headers


def _scrub(text: str, agent: AgentSpec) -> str:
    """Belt and braces: a server could echo the key back in an error body."""
    if agent.api_key is not None and agent.api_key.reveal():
        text = text.replace(agent.api_key.reveal(), "***")
    return text


def build_body(agent: AgentSpec, messages: list[dict[str, Any]], model: str | None, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model or agent.model, "messages": messages}
    body.update(agent.params)
    body.update(params)
    return body


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None for an HTTP date (rare from LLM servers) or inf/nan."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_text(status: int, text: str, agent: AgentSpec) -> str:
    # scrub before truncating: a key cut in half by the truncation would escape _scrub
    try:
        data = json.loads(text)
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        if message:
            return f"HTTP {status}: {_scrub(str(message), agent)[:300]}"
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {_scrub(text, agent)[:300]}"


Answer = tuple[int, str, "str | None"]  # status, body text, Retry-After header


async def _post_aiohttp(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], agent: AgentSpec, timeout_s: float
) -> Answer:
    """Workers' transport: aiohttp's pool costs O(1) per request (httpx's scans every connection)."""
    try:
        async with session.post(
            url, data=json.dumps(body), headers=_headers(agent), timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            return response.status, await response.text(), response.headers.get("retry-after")
    except TimeoutError:
        raise RequestFailure("timeout", f"no answer within {timeout_s:g} s") from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise RequestFailure("connection", f"{type(exc).__name__}: {exc or 'connection closed'}") from None
    except aiohttp.ClientError as exc:
        raise RequestFailure("other", f"{type(exc).__name__}: {exc}") from None


async def _post_httpx(client: httpx.AsyncClient, url: str, body: dict[str, Any], agent: AgentSpec, timeout_s: float) -> Answer:
    """Interactive chat's and tests' transport (httpx.MockTransport)."""
    try:
        response = await asyncio.wait_for(
            client.post(url, content=json.dumps(body), headers=_headers(agent), timeout=timeout_s),
            timeout=timeout_s + 1.0,  # a server that trickles bytes still ends in time
        )
    except (TimeoutError, httpx.TimeoutException):
        raise RequestFailure("timeout", f"no answer within {timeout_s:g} s") from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.NetworkError) as exc:
        raise RequestFailure("connection", f"{type(exc).__name__}: {exc or 'connection closed'}") from None
    except httpx.HTTPError as exc:
        raise RequestFailure("other", f"{type(exc).__name__}: {exc}") from None
    return response.status_code, response.text, response.headers.get("retry-after")


async def _attempt(client: Any, agent: AgentSpec, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    url = f"{agent.endpoint}/chat/completions"
    post = _post_aiohttp if isinstance(client, aiohttp.ClientSession) else _post_httpx
    status, text, retry_after = await post(client, url, body, agent, timeout_s)
    if status != 200:
        raise RequestFailure(classify_status(status, text), _error_text(status, text, agent), _retry_after(retry_after))
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        return {
            "response": choice["message"].get("content") or "",
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": (data.get("usage") or {}).get("prompt_tokens"),
            "completion_tokens": (data.get("usage") or {}).get("completion_tokens"),
            "model": data.get("model") or body["model"],
            "server_prompt_s": _timing_s(data.get("timings"), "prompt_ms"),
            "server_generation_s": _timing_s(data.get("timings"), "predicted_ms"),
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise RequestFailure("server_error", f"malformed response: {_scrub(text, agent)[:200]}") from None


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter; Retry-After is a floor, never ignored."""
    delay = random.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


async def chat_completion(
    client: Any,
    agent: AgentSpec,
    messages: list[dict[str, Any]],
    *,
    model: str | None = None,
    params: dict[str, Any] | None = None,
    max_attempts: int = 4,
    timeout_s: float = 120.0,
    backoff_s: float = 0.5,
    backoff_max_s: float = 30.0,
    on_failure: Callable[[RequestFailure], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    recover: Callable[[], Awaitable[Recovery]] | None = None,
) -> Outcome:
    """Send one chat request, retrying transient failures; the result never raises.

    A retry that ``should_stop`` prevents (the run is stopping, or a warm start hands over)
    is not a failure: the outcome is :data:`UNFINISHED`, and the prompt is sent again later.
    ``recover`` is asked after a connection failure when parsl-chat runs the endpoint's
    model server: a server that died and is back costs no attempt; one that is gone leaves
    the prompt unfinished.
    """
    body = build_body(agent, messages, model, params or {})
    started = time.time()
    attempt = 0
    free_retries = 3  # a server that keeps dying mid-answer: then the attempts count again

    def failed(failure: RequestFailure, status: str = "error") -> Outcome:
        return Outcome(
            status=status,
            attempts=attempt,
            started_at=started,
            finished_at=time.time(),
            model=body["model"],
            error_type=failure.error_type,
            error=_scrub(str(failure), agent),
        )

    while True:
        attempt += 1
        try:
            result = await _attempt(client, agent, body, timeout_s)
            return Outcome(status="ok", attempts=attempt, started_at=started, finished_at=time.time(), **result)
        except RequestFailure as failure:
            if on_failure is not None:
                on_failure(failure)
            if failure.error_type == "connection" and recover is not None:
                recovery = await recover()
                if recovery == "back" and free_retries > 0:
                    free_retries -= 1
                    attempt -= 1  # the server's death, not this prompt's failure
                    continue
                if recovery == "gone":
                    return failed(failure, UNFINISHED)
            if failure.error_type not in TRANSIENT or attempt >= max_attempts:
                return failed(failure)
            if should_stop is not None and should_stop():
                return failed(failure, UNFINISHED)
            await asyncio.sleep(backoff_delay(attempt, backoff_s, backoff_max_s, failure.retry_after_s))
            if should_stop is not None and should_stop():  # the stop came during the backoff
                return failed(failure, UNFINISHED)


async def stream_chat(
    client: httpx.AsyncClient,
    agent: AgentSpec,
    messages: list[dict[str, Any]],
    *,
    timeout_s: float = 120.0,
) -> AsyncIterator[dict[str, Any]]:
    """Stream one answer: yields ``{"delta": text}`` pieces, then ``{"usage": ..., "finish_reason": ...}``.

    Failures raise :class:`RequestFailure` (interactive use shows them and goes on).
    """
    body = build_body(agent, messages, None, {"stream": True, "stream_options": {"include_usage": True}})
    url = f"{agent.endpoint}/chat/completions"
    finish_reason = None
    usage: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, content=json.dumps(body), headers=_headers(agent), timeout=timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RequestFailure(
                    classify_status(response.status_code, text), f"HTTP {response.status_code}: {_scrub(text, agent)[:300]}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield {"delta": piece}
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    except httpx.TimeoutException:
        raise RequestFailure("timeout", f"no answer within {timeout_s:g} s") from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.NetworkError) as exc:
        raise RequestFailure("connection", _scrub(f"{type(exc).__name__}: {exc or 'connection closed'}", agent)) from None
    yield {"usage": usage, "finish_reason": finish_reason}
