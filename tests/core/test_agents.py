"""Unit tests for parsl_chat.core.agents: classification, retries and backoff, secrets, streaming (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

import parsl_chat.core.agents as agents_mod
from parsl_chat.config import AgentConfig, LimitsConfig, ProfileConfig, RunConfig, Secret, Settings, Source
from parsl_chat.core.agents import (
    ERROR_TYPES,
    TRANSIENT,
    UNFINISHED,
    AgentSpec,
    Outcome,
    RequestFailure,
    backoff_delay,
    build_body,
    chat_completion,
    classify_status,
    resolve_agents,
    stream_chat,
)

KEY = "sk-live-0123456789abcdefSECRET"
MESSAGES = [{"role": "user", "content": "Hi"}]


def agent(**over: Any) -> AgentSpec:
    base: dict[str, Any] = {
        "name": "analyst",
        "system_prompt": "be brief",
        "model": "small",
        "endpoint": "http://llm:8000/v1",
        "api_key": Secret(KEY),
        "params": {"temperature": 0.2, "max_tokens": 32},
    }
    base.update(over)
    return AgentSpec(**base)


def completion(content: str | None = "Hello!", **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "small-q4",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }
    data.update(over)
    return data


class Server:
    """Plays a scripted list of replies (responses, exceptions, or callables) and records the requests."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, type) and issubclass(reply, httpx.TransportError):
            raise reply("simulated", request=request)
        if callable(reply):
            result = reply(request)
            return await result if asyncio.iscoroutine(result) else result
        return reply

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff delays, recorded instead of slept."""
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(agents_mod.asyncio, "sleep", fake_sleep)
    return recorded


def complete(server: Server, spec: AgentSpec | None = None, **kw: Any) -> Outcome:
    async def main() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as client:
            return await chat_completion(client, spec or agent(), MESSAGES, **kw)

    return asyncio.run(main())


def ok_response(**over: Any) -> httpx.Response:
    return httpx.Response(200, json=completion(**over))


def error_response(status: int, message: str = "nope", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x"}}, headers=headers)


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, "", "rate_limit"),
        (429, "context_length_exceeded", "rate_limit"),
        (500, "", "server_error"),
        (502, "", "server_error"),
        (503, "maximum context length", "server_error"),
        (401, "", "auth"),
        (403, "", "auth"),
        (408, "", "timeout"),
        (400, '{"error": {"code": "context_length_exceeded"}}', "context_length"),
        (400, "This model's maximum context length is 2048 tokens", "context_length"),
        (400, "prompt exceeds the Context Length", "context_length"),
        (400, "Requested tokens (5000) exceed context window of 2048", "context_length"),  # llama-cpp-python
        (400, "the request exceeds the available context size, try increasing it", "context_length"),  # llama-server
        (413, "Request Entity Too Large", "context_length"),  # a proxy in front of the server
        (400, "bad json", "bad_request"),
        (404, "", "bad_request"),
        (422, "", "bad_request"),
        (302, "", "other"),
    ],
)
def test_classify_status(status: int, body: str, expected: str) -> None:
    assert classify_status(status, body) == expected


def test_error_types() -> None:
    assert set(TRANSIENT) == {"rate_limit", "server_error", "timeout", "connection"}
    assert set(TRANSIENT) <= set(ERROR_TYPES)
    assert {"bad_request", "context_length", "auth", "invalid_input", "interrupted", "other"} <= set(ERROR_TYPES)


# --------------------------------------------------------------------------- success


def test_success(sleeps: list[float]) -> None:
    server = Server(ok_response())
    outcome = complete(server)
    assert outcome.status == "ok"
    assert outcome.attempts == 1
    assert outcome.response == "Hello!"
    assert outcome.finish_reason == "stop"
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 3)
    assert outcome.model == "small-q4"  # what the server says it ran
    assert outcome.error is None and outcome.error_type is None
    assert outcome.started_at is not None and outcome.finished_at is not None
    assert outcome.finished_at >= outcome.started_at
    assert sleeps == []
    [request] = server.requests
    assert request.method == "POST"
    assert str(request.url) == "http://llm:8000/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert server.bodies[0] == {"model": "small", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 32}


def test_request_model_and_params_override(sleeps: list[float]) -> None:
    server = Server(ok_response())
    complete(server, model="big", params={"temperature": 0.9, "seed": 1})
    assert server.bodies[0] == {"model": "big", "messages": MESSAGES, "temperature": 0.9, "max_tokens": 32, "seed": 1}


def test_no_key_no_authorization_header(sleeps: list[float]) -> None:
    for key in (None, Secret("")):
        server = Server(ok_response())
        complete(server, agent(api_key=key))
        assert "authorization" not in server.requests[0].headers


def test_success_tolerates_sparse_answer(sleeps: list[float]) -> None:
    data = {"choices": [{"message": {"content": None}}]}
    outcome = complete(Server(httpx.Response(200, json=data)))
    assert outcome.status == "ok"
    assert outcome.response == ""
    assert outcome.finish_reason is None and outcome.prompt_tokens is None
    assert outcome.model == "small"  # the model asked for


def test_build_body() -> None:
    spec = agent(params={"temperature": 0.1})
    body = build_body(spec, MESSAGES, None, {"max_tokens": 5})
    assert body == {"model": "small", "messages": MESSAGES, "temperature": 0.1, "max_tokens": 5}
    assert build_body(spec, MESSAGES, "other", {"temperature": 1})["temperature"] == 1
    assert build_body(spec, MESSAGES, "other", {})["model"] == "other"


# --------------------------------------------------------------------------- retries


def test_429_retry_after_honoured(sleeps: list[float]) -> None:
    server = Server(error_response(429, "slow down", {"Retry-After": "7"}), ok_response())
    outcome = complete(server, backoff_s=0.01, backoff_max_s=0.02)
    assert outcome.status == "ok"
    assert outcome.attempts == 2
    assert sleeps == [7.0]  # Retry-After is a floor above the (tiny) backoff


def test_429_fractional_retry_after(sleeps: list[float]) -> None:
    server = Server(
        error_response(429, headers={"retry-after": "0.25"}), error_response(429, headers={"retry-after": "1.5"}), ok_response()
    )
    outcome = complete(server, backoff_s=0.0, backoff_max_s=0.0)
    assert outcome.attempts == 3
    assert sleeps == [0.25, 1.5]


@pytest.mark.parametrize("value", ["Wed, 21 Oct 2015 07:28:00 GMT", "soon", "inf", "nan"])
def test_unusable_retry_after_falls_back_to_backoff(sleeps: list[float], value: str) -> None:
    server = Server(error_response(429, headers={"Retry-After": value}), ok_response())
    outcome = complete(server, backoff_s=0.5, backoff_max_s=30)
    assert outcome.status == "ok"
    assert len(sleeps) == 1
    assert 0 <= sleeps[0] <= 0.5


def test_negative_retry_after_is_zero(sleeps: list[float]) -> None:
    server = Server(error_response(429, headers={"Retry-After": "-3"}), ok_response())
    complete(server, backoff_s=0.0, backoff_max_s=0.0)
    assert sleeps == [0.0]


def test_5xx_retried_until_max_attempts(sleeps: list[float]) -> None:
    server = Server(error_response(500, "internal"))
    outcome = complete(server, max_attempts=4, backoff_s=0.5, backoff_max_s=30)
    assert outcome.status == "error"
    assert outcome.attempts == 4
    assert len(server.requests) == 4
    assert outcome.error_type == "server_error"
    assert outcome.error == "HTTP 500: internal"
    assert outcome.model == "small"
    assert outcome.response is None
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):
        assert 0 <= delay <= 0.5 * 2 ** (attempt - 1)


def test_backoff_grows_and_is_capped(sleeps: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agents_mod.random, "uniform", lambda lo, hi: hi)  # the top of the jitter range
    outcome = complete(Server(error_response(503)), max_attempts=6, backoff_s=0.5, backoff_max_s=3.0)
    assert outcome.attempts == 6
    assert sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_delay() -> None:
    for attempt in range(1, 8):
        for _ in range(20):
            assert 0 <= backoff_delay(attempt, 0.5, 4.0, None) <= min(4.0, 0.5 * 2 ** (attempt - 1))
    assert backoff_delay(1, 0.5, 4.0, 10.0) == 10.0
    assert backoff_delay(5, 0.0, 0.0, None) == 0.0


def test_then_success_after_mixed_transients(sleeps: list[float]) -> None:
    server = Server(
        error_response(502),
        httpx.ConnectError,
        httpx.ReadTimeout,
        ok_response(),
    )
    outcome = complete(server, max_attempts=4)
    assert outcome.status == "ok"
    assert outcome.attempts == 4
    assert len(sleeps) == 3


@pytest.mark.parametrize(
    ("reply", "error_type", "fragment"),
    [
        (httpx.ConnectError, "connection", "ConnectError: simulated"),
        (httpx.ReadError, "connection", "ReadError: simulated"),
        (httpx.RemoteProtocolError, "connection", "RemoteProtocolError: simulated"),
        (httpx.WriteError, "connection", "WriteError: simulated"),
        (httpx.ReadTimeout, "timeout", "no answer within 5 s"),
        (httpx.ConnectTimeout, "timeout", "no answer within 5 s"),
        (httpx.PoolTimeout, "timeout", "no answer within 5 s"),
        (lambda r: error_response(408), "timeout", "HTTP 408"),
        (lambda r: httpx.Response(200, text="<html>oops</html>"), "server_error", "malformed response: <html>oops</html>"),
        (lambda r: httpx.Response(200, json={"choices": []}), "server_error", "malformed response"),
        (lambda r: httpx.Response(200, json=[1, 2]), "server_error", "malformed response"),
    ],
)
def test_transient_failures_are_retried(sleeps: list[float], reply: Any, error_type: str, fragment: str) -> None:
    server = Server(reply)
    outcome = complete(server, max_attempts=3, timeout_s=5)
    assert outcome.status == "error"
    assert outcome.error_type == error_type
    assert fragment in (outcome.error or "")
    assert outcome.attempts == 3
    assert len(server.requests) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("response", "error_type", "error"),
    [
        (error_response(400, "temperature must be <= 2"), "bad_request", "HTTP 400: temperature must be <= 2"),
        (error_response(401, "invalid api key"), "auth", "HTTP 401: invalid api key"),
        (error_response(403, "forbidden"), "auth", "HTTP 403: forbidden"),
        (error_response(404, "no such model"), "bad_request", "HTTP 404: no such model"),
        (
            httpx.Response(
                400,
                json={
                    "error": {"message": "This model's maximum context length is 2048 tokens", "code": "context_length_exceeded"}
                },
            ),
            "context_length",
            "HTTP 400: This model's maximum context length is 2048 tokens",
        ),
        (httpx.Response(400, json={"error": "plain string error"}), "bad_request", "HTTP 400: plain string error"),
        (httpx.Response(400, text="not json at all"), "bad_request", "HTTP 400: not json at all"),
        (httpx.Response(400, json=["a list"]), "bad_request", 'HTTP 400: ["a list"]'),
        (httpx.Response(302, text=""), "other", "HTTP 302: "),
    ],
)
def test_permanent_failures_not_retried(sleeps: list[float], response: httpx.Response, error_type: str, error: str) -> None:
    server = Server(response)
    outcome = complete(server, max_attempts=5)
    assert outcome.status == "error"
    assert outcome.error_type == error_type
    assert outcome.error == error
    assert outcome.attempts == 1
    assert len(server.requests) == 1
    assert sleeps == []


def test_long_error_message_truncated(sleeps: list[float]) -> None:
    outcome = complete(Server(error_response(400, "x" * 5000)))
    assert outcome.error == "HTTP 400: " + "x" * 300


def test_other_httpx_error(sleeps: list[float]) -> None:
    outcome = complete(Server(httpx.UnsupportedProtocol("weird scheme")))
    assert outcome.error_type == "other"
    assert outcome.attempts == 1
    assert "UnsupportedProtocol: weird scheme" in (outcome.error or "")


def test_asyncio_timeout_of_a_trickling_server(sleeps: list[float]) -> None:
    """The client timeout is per read; asyncio.wait_for bounds the whole request (timeout_s + 1 s)."""

    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    outcome = complete(Server(never), max_attempts=1, timeout_s=0.01)
    assert outcome.error_type == "timeout"
    assert outcome.error == "no answer within 0.01 s"


def test_max_attempts_one(sleeps: list[float]) -> None:
    server = Server(error_response(500))
    assert complete(server, max_attempts=1).attempts == 1
    assert sleeps == []


def test_on_failure_called_for_each_failed_attempt(sleeps: list[float]) -> None:
    seen: list[tuple[str, float | None]] = []
    server = Server(error_response(429, headers={"Retry-After": "2"}), error_response(500), ok_response())
    outcome = complete(server, on_failure=lambda f: seen.append((f.error_type, f.retry_after_s)))
    assert outcome.status == "ok"
    assert seen == [("rate_limit", 2.0), ("server_error", None)]


def test_a_retry_the_stop_prevents_leaves_the_prompt_unfinished_not_failed(sleeps: list[float]) -> None:
    server = Server(error_response(503))
    outcome = complete(server, max_attempts=10, should_stop=lambda: True)
    assert outcome.status == UNFINISHED and outcome.error_type == "server_error"
    assert outcome.attempts == 1
    assert sleeps == []
    # the stop came during the first backoff: the second attempt is not sent
    stop_after = iter([False, True])
    outcome = complete(Server(error_response(503)), max_attempts=10, should_stop=lambda: next(stop_after))
    assert outcome.status == UNFINISHED and outcome.attempts == 1 and len(sleeps) == 1


def test_final_failures_stay_final_when_the_run_stops(sleeps: list[float]) -> None:
    # a permanent failure, and transient ones that used up max_attempts, are the prompt's own
    assert complete(Server(error_response(400)), should_stop=lambda: True).status == "error"
    outcome = complete(Server(error_response(500)), max_attempts=1, should_stop=lambda: True)
    assert outcome.status == "error" and outcome.error_type == "server_error"


@pytest.mark.parametrize(
    ("recovery", "status", "attempts"),
    [("back", "ok", 1), ("up", "ok", 2), ("gone", UNFINISHED, 1)],
)
def test_recover_after_a_connection_failure(recovery: str, status: str, attempts: int, sleeps: list[float]) -> None:
    asked: list[int] = []

    async def recover() -> str:
        asked.append(1)
        return recovery

    server = Server(httpx.ConnectError("refused"), ok_response())
    outcome = complete(server, recover=recover)
    assert (outcome.status, outcome.attempts) == (status, attempts)
    assert asked == [1]
    # 'back': the server died and is back, so the failed attempt does not count and there is no backoff
    assert (sleeps == []) == (recovery != "up")


def test_recover_is_not_asked_for_other_failures(sleeps: list[float]) -> None:
    asked: list[int] = []

    async def recover() -> str:
        asked.append(1)
        return "back"

    assert complete(Server(error_response(500), ok_response()), recover=recover).attempts == 2
    assert asked == []


def test_a_server_that_keeps_dying_counts_attempts_again(sleeps: list[float]) -> None:
    async def recover() -> str:
        return "back"

    outcome = complete(Server(httpx.ConnectError("refused")), max_attempts=2, recover=recover)
    assert outcome.status == "error" and outcome.error_type == "connection"
    assert len(outcome.error or "") > 0 and outcome.attempts == 2


# --------------------------------------------------------------------------- secrets


def _echo_key_replies() -> list[Any]:
    return [
        lambda r: httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}}),
        lambda r: httpx.Response(400, text=f"bad header {r.headers['authorization']}"),
        # the key straddles the 300-character cut: a prefix must not escape either
        lambda r: httpx.Response(400, json={"error": {"message": "x" * 285 + f" key={KEY}"}}),
        lambda r: httpx.Response(400, text="y" * 290 + KEY),
        lambda r: httpx.Response(500, text=f"upstream said {KEY}"),
        lambda r: httpx.Response(200, text=f"not json {KEY}"),
        lambda r: httpx.Response(200, text="z" * 190 + KEY),
        httpx.ConnectError(f"failed to connect with {KEY}"),
        httpx.ReadError(f"peer closed while sending Bearer {KEY}"),
        httpx.UnsupportedProtocol(f"bad url http://user:{KEY}@host"),
    ]


@pytest.mark.parametrize("reply", _echo_key_replies())
def test_api_key_never_in_error(sleeps: list[float], reply: Any) -> None:
    outcome = complete(Server(reply), max_attempts=2)
    assert outcome.status == "error"
    text = repr(outcome)
    assert KEY not in text
    assert KEY[:6] not in text  # no recognisable prefix either
    assert "SECRET" not in text


def test_agent_spec_hides_key() -> None:
    spec = agent()
    assert KEY not in repr(spec)
    assert KEY not in json.dumps(spec.describe())
    assert spec.describe() == {
        "name": "analyst",
        "model": "small",
        "endpoint": "http://llm:8000/v1",
        "concurrency": 4,
        "weight": 1.0,
    }


# --------------------------------------------------------------------------- streaming


def sse(*chunks: Any, done: bool = True) -> bytes:
    lines = [": keep-alive", ""]
    for chunk in chunks:
        lines += [f"data: {json.dumps(chunk)}", ""]
    if done:
        lines += ["data: [DONE]", ""]
    return ("\n".join(lines) + "\n").encode()


def delta(text: str | None = None, finish: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def stream(server: Server, spec: AgentSpec | None = None, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as client:
            return [piece async for piece in stream_chat(client, spec or agent(), MESSAGES, timeout_s=timeout_s)]

    return asyncio.run(main())


def test_stream_chat_parses_sse() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        delta("Hel"),
        delta(""),
        delta("lo"),
        delta(None, "stop"),
        {"choices": [], "usage": usage},
    )
    server = Server(httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    pieces = stream(server)
    assert pieces == [{"delta": "Hel"}, {"delta": "lo"}, {"usage": usage, "finish_reason": "stop"}]
    sent = server.bodies[0]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "small" and sent["messages"] == MESSAGES and sent["temperature"] == 0.2
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_stream_chat_without_done_or_usage() -> None:
    body = sse(delta("a"), delta("b", "length"), done=False)
    pieces = stream(Server(httpx.Response(200, content=body)))
    assert pieces == [{"delta": "a"}, {"delta": "b"}, {"usage": {}, "finish_reason": "length"}]


def test_stream_chat_stops_at_done() -> None:
    body = sse(delta("a")) + b"data: " + json.dumps(delta("after")).encode() + b"\n\n"
    pieces = stream(Server(httpx.Response(200, content=body)))
    assert [p for p in pieces if "delta" in p] == [{"delta": "a"}]


def test_stream_chat_data_without_space() -> None:
    body = b'data:{"choices":[{"delta":{"content":"x"}}]}\n\ndata:[DONE]\n\n'
    assert stream(Server(httpx.Response(200, content=body)))[0] == {"delta": "x"}


@pytest.mark.parametrize(
    ("status", "error_type"), [(429, "rate_limit"), (500, "server_error"), (401, "auth"), (400, "bad_request")]
)
def test_stream_chat_http_error(status: int, error_type: str) -> None:
    server = Server(httpx.Response(status, text=f"failure; you sent {KEY}"))
    with pytest.raises(RequestFailure) as info:
        stream(server)
    assert info.value.error_type == error_type
    assert str(info.value).startswith(f"HTTP {status}: failure; you sent ")
    assert KEY not in str(info.value)


def test_stream_chat_context_length() -> None:
    server = Server(httpx.Response(400, text="maximum context length exceeded"))
    with pytest.raises(RequestFailure) as info:
        stream(server)
    assert info.value.error_type == "context_length"


@pytest.mark.parametrize(
    ("reply", "error_type"),
    [(httpx.ConnectError, "connection"), (httpx.ReadError, "connection"), (httpx.ReadTimeout, "timeout")],
)
def test_stream_chat_transport_errors(reply: Any, error_type: str) -> None:
    with pytest.raises(RequestFailure) as info:
        stream(Server(reply), timeout_s=3)
    assert info.value.error_type == error_type
    if error_type == "timeout":
        assert str(info.value) == "no answer within 3 s"


def test_stream_chat_connection_error_scrubbed() -> None:
    with pytest.raises(RequestFailure) as info:
        stream(Server(httpx.ConnectError(f"cannot reach, key {KEY}")))
    assert KEY not in str(info.value)


# --------------------------------------------------------------------------- resolve_agents


def settings(agents: tuple[AgentConfig, ...] = (), count: int = 3, explicit: bool = False, concurrency: int = 4) -> Settings:
    run = RunConfig(agents=agents, agent_count=count, limits=LimitsConfig(concurrency=concurrency))
    sources = {"agent_count": Source("cli", "agent_count")} if explicit else {}
    return Settings(ProfileConfig(), run, sources, [])


def test_resolve_agents_defaults() -> None:
    specs = resolve_agents(settings(), "http://h:1/v1/", "m", Secret(KEY))
    assert [s.name for s in specs] == ["agent", "agent-2", "agent-3"]
    assert all(s.endpoint == "http://h:1/v1" and s.model == "m" and s.api_key == Secret(KEY) for s in specs)
    # no endpoint configured: the three agents are on the embedded server and share its slots (this
    # machine's: llama-server's slots from its cores, or 1 for llama-cpp-python's server)
    from parsl_chat.core.llama_build import embedded_slots_share

    share = embedded_slots_share(settings(), 3)
    assert share is not None and all(s.concurrency == share for s in specs)
    # limits.concurrency set by the user wins
    configured = settings()
    configured.sources["limits.concurrency"] = Source("yaml", "limits.concurrency")
    assert all(s.concurrency == 4 for s in resolve_agents(configured, "http://h:1/v1/", "m", None))


def test_resolve_agents_configured_count_wins_unless_explicit() -> None:
    configured = (AgentConfig(name="a"), AgentConfig(name="b"))
    assert [s.name for s in resolve_agents(settings(configured), "http://h/v1", "m", None)] == ["a", "b"]
    explicit = resolve_agents(settings(configured, count=5, explicit=True), "http://h/v1", "m", None)
    assert [s.name for s in explicit] == ["a", "b", "a-2", "b-2", "a-3"]
    assert [s.name for s in resolve_agents(settings(configured, count=1, explicit=True), "http://h/v1", "m", None)] == ["a"]


def test_resolve_agents_own_values_win() -> None:
    configured = (
        AgentConfig(
            name="a",
            model="own",
            endpoint="http://own:2/v1/chat/completions",
            api_key=Secret("own-key"),
            params={"temperature": 0},
            weight=2.0,
            concurrency=9,
        ),
        AgentConfig(name="b"),
    )
    own = settings(configured, concurrency=3)
    own.sources["limits.concurrency"] = Source("yaml", "limits.concurrency")  # set: not the embedded slots' share
    a, b = resolve_agents(own, "http://run/v1", "run-model", Secret(KEY))
    assert (a.model, a.endpoint, a.api_key, a.params, a.weight, a.concurrency) == (
        "own",
        "http://own:2/v1",
        Secret("own-key"),
        {"temperature": 0},
        2.0,
        9,
    )
    assert (b.model, b.endpoint, b.api_key, b.concurrency) == ("run-model", "http://run/v1", Secret(KEY), 3)
    assert a.params is not configured[0].params  # each spec owns its params


def test_request_failure() -> None:
    failure = RequestFailure("rate_limit", "HTTP 429", 3.0)
    assert (failure.error_type, str(failure), failure.retry_after_s) == ("rate_limit", "HTTP 429", 3.0)
    assert RequestFailure("auth", "x").retry_after_s is None


def test_llama_server_timings_say_where_the_latency_went(sleeps: list[float]) -> None:
    """llama-server's per-response timings: prompt and generation time; the rest was the wait for a slot."""
    from parsl_chat.worker.executor import _server_times

    timings = {"prompt_n": 7, "prompt_ms": 40.0, "predicted_n": 3, "predicted_ms": 160.0}
    outcome = complete(Server(ok_response(timings=timings)))
    assert (outcome.server_prompt_s, outcome.server_generation_s) == (0.04, 0.16)
    assert outcome.server_s == pytest.approx(0.2)
    outcome.started_at, outcome.finished_at = 100.0, 101.5
    assert _server_times(outcome) == {"server_queue_s": 1.3, "server_prompt_s": 0.04, "server_generation_s": 0.16}
    # servers without timings (vLLM, hosted APIs, the simulator), or odd values: nothing is made up
    plain = complete(Server(ok_response()))
    assert plain.server_s is None and _server_times(plain)["server_queue_s"] is None
    odd = complete(Server(ok_response(timings={"prompt_ms": "fast", "predicted_ms": -1})))
    assert (odd.server_prompt_s, odd.server_generation_s) == (None, None)
