"""The simulated endpoint, exercised over real loopback HTTP with openai and httpx.

Most tests run the app in a thread (starts in milliseconds); the SimulatedServer
tests pay for a real child process, as users and benchmarks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from parsl_chat.errors import ServerError
from parsl_chat.serve.simulated import READY_PREFIX, FaultPlan, SimulatedServer, main, make_app, run_server

TIMEOUT_S = 10.0  # every client call is bounded; nothing here should take close to this


@contextlib.contextmanager
def _serve_in_thread(plan: FaultPlan, **kwargs: Any) -> Iterator[str]:
    """make_app on a loopback port in a background event loop; yields the /v1 base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def setup() -> web.AppRunner:
        runner = web.AppRunner(make_app(plan, **kwargs), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(setup(), loop).result(TIMEOUT_S)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT_S)
        loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(FaultPlan(...)) -> base URL; every server is shut down after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda plan=None, **kw: stack.enter_context(_serve_in_thread(plan or FaultPlan(), **kw))


def _client(url: str, timeout: float = TIMEOUT_S) -> openai.OpenAI:
    # max_retries=0: these tests look at what the server did, not at the client's retries.
    return openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=timeout)


# One keep-alive client for the module: a fresh httpx.post() costs ~40 ms of TLS-context setup.
_HTTP = httpx.Client(timeout=TIMEOUT_S)


@pytest.fixture(autouse=True, scope="module")
def _close_http_client() -> Iterator[None]:
    yield
    _HTTP.close()


def _post(url: str, content: str, timeout: float = TIMEOUT_S, **body: Any) -> httpx.Response:
    payload = {"model": "m", "messages": [{"role": "user", "content": content}], **body}
    return _HTTP.post(url + "/chat/completions", json=payload, timeout=timeout)


def _root(url: str) -> str:
    return url.removesuffix("/v1")


def _log(url: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = _HTTP.get(_root(url) + "/_requests").json()
    return data


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.eE+-]+|NaN|[+-]Inf)$")


def _metrics(url: str) -> dict[str, float]:
    """Parse Prometheus text exposition strictly: every line is a comment or a valid sample."""
    response = _HTTP.get(_root(url) + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith(("# HELP ", "# TYPE ")):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------- answers


def test_answer_shape_and_usage(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(model="sim-model"))
    completion = _client(url).chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "one two three four five six seven eight nine ten"},
        ],
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert isinstance(completion.created, int)
    assert completion.model == "gpt-test"  # the requested model is echoed
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    # "sim" + the first 8 prompt words, padded with "tok" to completion_tokens (16) words.
    assert choice.message.content == "sim one two three four five six seven eight" + " tok" * 7
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3 + 10  # whitespace words of all messages
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == 29


def test_answer_defaults_model_and_accepts_content_parts(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(model="sim-model", completion_tokens=4))
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello parts"}]}]}
    data = httpx.post(url + "/chat/completions", json=body, timeout=TIMEOUT_S).json()
    assert data["model"] == "sim-model"
    assert data["choices"][0]["message"]["content"] == "sim hello parts tok"
    ids = {_post(url, "x").json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_streaming_with_usage(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(completion_tokens=6))
    stream = _client(url).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "sim stream me please tok tok"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 6)

    raw = _post(url, "raw", stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    # Without include_usage there is no usage chunk and no usage key.
    assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in events[:-1])


def test_max_tokens_gives_finish_reason_length(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(completion_tokens=16))
    client = _client(url)
    short = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b c d e"}], max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == "sim a b"
    assert short.usage is not None and short.usage.completion_tokens == 3
    enough = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=16)
    assert enough.choices[0].finish_reason == "stop"
    streamed = _post(url, "a b c d e", stream=True, max_tokens=2).text
    assert '"finish_reason":"length"' in streamed
    assert _post(url, "a", max_tokens=0).status_code == 400


def test_bad_json_body_is_an_openai_style_400(serve: Callable[..., str]) -> None:
    url = serve()
    response = httpx.post(
        url + "/chat/completions", content=b"{not json", timeout=TIMEOUT_S, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_probes_and_models(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(model="tiny"))
    assert httpx.get(_root(url) + "/health", timeout=TIMEOUT_S).json() == {"status": "ok"}
    assert [m.id for m in _client(url).models.list()] == ["tiny"]


# --------------------------------------------------------------------------- markers and rates


@pytest.mark.parametrize(
    ("marker", "status", "exc_type", "code"),
    [
        ("__bad_request__", 400, openai.BadRequestError, None),
        ("__context_length__", 400, openai.BadRequestError, "context_length_exceeded"),
        ("__auth__", 401, openai.AuthenticationError, "invalid_api_key"),
        ("__server_error__", 500, openai.InternalServerError, None),
    ],
)
def test_error_markers(
    serve: Callable[..., str], marker: str, status: int, exc_type: type[openai.APIStatusError], code: str | None
) -> None:
    url = serve()
    with pytest.raises(exc_type) as caught:
        _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {marker} x"}])
    assert caught.value.status_code == status
    error = caught.value.response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    if status == 400:
        assert error["type"] == "invalid_request_error"
    assert _log(url)[-1]["status"] == status


def test_markers_win_over_rates(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_500=1.0))
    assert _post(url, "__bad_request__").status_code == 400
    url = serve(FaultPlan(fail_first_attempts=5))
    assert _post(url, "__auth__").status_code == 401


def test_slow_marker_adds_latency(serve: Callable[..., str]) -> None:
    url = serve()
    start = time.monotonic()
    assert _post(url, "take it __slow_300__ easy").status_code == 200
    assert time.monotonic() - start >= 0.3


def test_hang_marker_makes_the_client_time_out(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(max_concurrency=1))
    with pytest.raises(openai.APITimeoutError):
        _client(url, timeout=0.3).chat.completions.create(model="m", messages=[{"role": "user", "content": "__hang__"}])
    assert _log(url)[-1]["status"] == "hang"
    # The client gave up, so the hung request must release its only slot.
    _wait_for(lambda: _metrics(url)["llamacpp:requests_processing"] == 0)
    assert _post(url, "next", timeout=2.0).status_code == 200


def test_rate_hang_makes_the_client_time_out(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_hang=1.0))
    with pytest.raises(httpx.ReadTimeout):
        _post(url, "anything", timeout=0.3)


def test_429_carries_retry_after(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_429=1.0, retry_after_s=2))
    response = _post(url, "x")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.headers["retry-after-ms"] == "2000"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])

    # Fractions are kept so retry tests need not sleep whole seconds.
    assert _post(serve(FaultPlan(rate_429=1.0, retry_after_s=0.25)), "x").headers["Retry-After"] == "0.25"


def test_rate_500_of_one_always_fails(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_500=1.0))
    assert {_post(url, f"p{i}").status_code for i in range(20)} == {500}
    assert _post(url, "s", stream=True).status_code == 500


def test_seeded_rates_are_reproducible(serve: Callable[..., str]) -> None:
    def statuses(seed: int) -> list[int]:
        plan = FaultPlan(rate_500=0.3, rate_429=0.3, seed=seed, jitter_ms=5)
        url = serve(plan)
        return [_post(url, f"prompt {i}").status_code for i in range(40)]

    first = statuses(7)
    assert first == statuses(7)
    assert first != statuses(8)
    assert set(first) == {200, 429, 500}


def test_fail_first_attempts_then_succeeds(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(fail_first_attempts=2))
    assert [_post(url, "alpha").status_code for _ in range(4)] == [500, 500, 200, 200]
    assert [_post(url, "beta").status_code for _ in range(3)] == [500, 500, 200]
    log = _log(url)
    assert [(e["prompt"], e["attempt"], e["status"]) for e in log[:3]] == [
        ("alpha", 1, 500),
        ("alpha", 2, 500),
        ("alpha", 3, 200),
    ]


def test_drop_closes_the_connection(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_drop=1.0))
    with pytest.raises(httpx.RemoteProtocolError):
        _post(url, "x")
    with pytest.raises(openai.APIConnectionError):
        _client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}])
    assert [e["status"] for e in _log(url)] == ["drop", "drop"]
    assert httpx.get(_root(url) + "/health", timeout=TIMEOUT_S).status_code == 200


# --------------------------------------------------------------------------- slots, metrics, log


def _concurrent_finish_times(url: str, n: int) -> tuple[float, list[float]]:
    start = time.monotonic()

    def one(i: int) -> float:
        assert _post(url, f"q{i}").status_code == 200
        return time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        finished = sorted(pool.map(one, range(n)))
    return time.monotonic() - start, finished


def test_max_concurrency_queues_requests(serve: Callable[..., str]) -> None:
    elapsed, finished = _concurrent_finish_times(serve(FaultPlan(latency_ms=200, max_concurrency=1)), 4)
    assert elapsed >= 0.8 - 0.02
    # One slot: answers come out one latency apart, not together.
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(finished))

    elapsed, _ = _concurrent_finish_times(serve(FaultPlan(latency_ms=200, max_concurrency=4)), 4)
    assert elapsed < 0.7  # four slots: served together (generous bound, not a timing test)


def test_metrics_reflect_in_flight_requests(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(latency_ms=400, max_concurrency=1, model="m1"))
    idle = _metrics(url)
    assert idle["llamacpp:requests_processing"] == 0
    assert idle["simulated_requests_total"] == 0

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_post, url, f"m{i}") for i in range(3)]
        _wait_for(lambda: _metrics(url)["llamacpp:requests_deferred"] == 2)
        busy = _metrics(url)
        assert busy["llamacpp:requests_processing"] == 1
        assert busy['vllm:num_requests_running{model_name="m1"}'] == 1
        assert busy['vllm:num_requests_waiting{model_name="m1"}'] == 2
        assert busy["simulated_requests_total"] == 3
        assert all(f.result(TIMEOUT_S).status_code == 200 for f in futures)

    done = _metrics(url)
    assert done["llamacpp:requests_processing"] == done["llamacpp:requests_deferred"] == 0
    assert done['simulated_responses_total{status="200"}'] == 3
    assert done["llamacpp:tokens_predicted_total"] == 3 * 16


def test_request_log_records_attempts(serve: Callable[..., str], tmp_path: Path) -> None:
    log_path = tmp_path / "requests.jsonl"
    url = serve(FaultPlan(model="m"), log_path=str(log_path))
    before = time.time()
    for content in ("same", "other", "same", "same"):
        _post(url, content)
    log = _log(url)
    assert [(e["prompt"], e["attempt"]) for e in log] == [("same", 1), ("other", 1), ("same", 2), ("same", 3)]
    assert all(e["status"] == 200 and e["model"] == "m" and e["t"] >= before - 1 for e in log)
    # Flushed per line: readable while the server still runs.
    assert [json.loads(line) for line in log_path.read_text().splitlines()] == log


def test_fault_plan_rejects_impossible_values() -> None:
    with pytest.raises(ValueError, match="must not exceed 1"):
        FaultPlan(rate_500=0.6, rate_429=0.6)
    with pytest.raises(ValueError, match="rate_drop"):
        FaultPlan(rate_drop=1.5)
    with pytest.raises(ValueError, match="completion_tokens"):
        FaultPlan(completion_tokens=0)
    with pytest.raises(SystemExit) as caught:
        main(["--rate-500", "2"])
    assert caught.value.code == 2


# --------------------------------------------------------------------------- subprocess


def test_simulated_server_start_and_stop(tmp_path: Path) -> None:
    with SimulatedServer(FaultPlan(model="child", completion_tokens=3)) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        reply = _client(server.url).chat.completions.create(model="child", messages=[{"role": "user", "content": "ping"}])
        assert reply.choices[0].message.content == "sim ping tok"
        assert [r["prompt"] for r in server.requests()] == ["ping"]
        url = server.url
    # Stopped: the port no longer answers, the log survives, stop() is idempotent.
    with pytest.raises(httpx.ConnectError):
        httpx.get(_root(url) + "/health", timeout=2.0)
    assert [r["prompt"] for r in server.requests()] == ["ping"]
    server.stop()
    with pytest.raises(ServerError):
        _ = server.url


def test_simulated_server_log_path_survives_the_server(tmp_path: Path) -> None:
    log_path = tmp_path / "log.jsonl"
    server = SimulatedServer(FaultPlan(fail_first_attempts=1), log_path=log_path).start()
    try:
        assert _post(server.url, "again").status_code == 500
        assert _post(server.url, "again").status_code == 200
    finally:
        server.stop()
    assert [(r["attempt"], r["status"]) for r in server.requests()] == [(1, 500), (2, 200)]


def test_simulated_server_bad_port_raises_server_error() -> None:
    with pytest.raises(ServerError, match="--port"):
        SimulatedServer(port=70000).start()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SimulatedServer(port=taken.getsockname()[1])
        with pytest.raises(ServerError) as caught:
            server.start()
    assert "in use" in str(caught.value).lower()
    server.stop()  # harmless after a failed start


def test_reading_the_childs_output_leaves_the_shared_offset_alone(tmp_path: Path) -> None:
    # The child writes through the same open file; a parent seek between print()'s two
    # writes once put the newline over the ready line's first byte (CI, twice).
    from parsl_chat.serve.simulated import _contents

    with (tmp_path / "out").open("w+b") as shared:
        shared.write(b"parsl-chat simulated endpoint: http://h:1/v1")
        shared.flush()
        assert _contents(shared) == b"parsl-chat simulated endpoint: http://h:1/v1"
        assert os.lseek(shared.fileno(), 0, os.SEEK_CUR) == 44  # where the child's "\n" will go
        shared.write(b"\n")
        shared.flush()
        assert _contents(shared).splitlines() == [b"parsl-chat simulated endpoint: http://h:1/v1"]


def test_simulated_server_that_hangs_at_start_up_reports_where(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child that never gets ready: the error names the phase, the kernel state and the child's Python stack.
    child = "import faulthandler, signal, time; faulthandler.register(signal.SIGUSR1, all_threads=True); time.sleep(60)"
    monkeypatch.setattr(SimulatedServer, "argv", lambda self: [sys.executable, "-c", child])
    server = SimulatedServer(startup_timeout_s=1)
    with pytest.raises(ServerError) as caught:
        server.start()
    message = str(caught.value)
    assert "was not ready after 1 s: it printed no ready line" in message
    assert re.search(r"pid \d+, state S", message), message
    assert "most recent call first" in message and 'File "<string>", line 1' in message, message


def test_run_server_taken_port_is_a_server_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerError, match="cannot listen"):
            run_server(FaultPlan(), port=taken.getsockname()[1], ready=lambda url: pytest.fail("never ready"))


def test_module_prints_exactly_one_ready_line(tmp_path: Path) -> None:
    """``python -m parsl_chat.serve.simulated``: one URL line on stdout, then serves until SIGTERM."""
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-m", "parsl_chat.serve.simulated", "--model", "cli"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child exits (EOF) if it cannot start
        assert line.startswith(READY_PREFIX), line
        url = line[len(READY_PREFIX) :].strip()
        assert httpx.get(url + "/models", timeout=TIMEOUT_S).json()["data"][0]["id"] == "cli"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0
    assert out == ""  # nothing after the ready line


# --------------------------------------------------------------------------- structured answers

_EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["pos", "neg", "neutral"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "p": {"type": ["number", "null"], "maximum": 1},
        "sure": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2},
        "who": {"$ref": "#/$defs/person"},
        "code": {"const": "X1"},
        "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    },
    "required": ["label", "score", "p", "sure", "tags", "who", "code", "either"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string", "minLength": 3}}, "required": ["name"]}},
}


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "extract", "schema": schema, "strict": True}}


def _content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def test_structured_answer_matches_the_schema(serve: Callable[..., str]) -> None:
    import jsonschema

    url = serve()
    answers = {}
    for prompt in ("I love it", "this is dreadful and slow", "ok"):
        answer = json.loads(_content(_post(url, prompt, response_format=_schema_format(_EXTRACT_SCHEMA))))
        jsonschema.validate(answer, _EXTRACT_SCHEMA)
        answers[prompt] = answer
    assert answers["ok"]["who"]["name"] == "okx"  # padded to minLength from the prompt's words
    assert len({a["label"] for a in answers.values()}) > 1  # enum values spread over prompts, as labels do
    again = json.loads(_content(_post(url, "I love it", response_format=_schema_format(_EXTRACT_SCHEMA))))
    assert again == answers["I love it"]  # the same prompt, the same answer
    assert json.loads(_content(_post(url, "hi there", response_format={"type": "json_object"}))) == {"answer": "sim hi there"}
    assert _content(_post(url, "hi there", response_format={"type": "text"})).startswith("sim hi there")


@pytest.mark.parametrize(("marker", "spoilt"), [("__invalid_json_2__", "Sure!"), ("__wrong_schema_2__", '["not"')])
def test_spoiling_markers_last_n_attempts(serve: Callable[..., str], marker: str, spoilt: str) -> None:
    url = serve()
    fmt = _schema_format({"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]})
    answers = [_content(_post(url, f"classify {marker}", response_format=fmt)) for _ in range(3)]
    assert answers[0].startswith(spoilt) and answers[1].startswith(spoilt)
    assert json.loads(answers[2]) == {"label": f"classify {marker}"}


def test_rate_invalid_output(serve: Callable[..., str]) -> None:
    url = serve(FaultPlan(rate_invalid_output=1.0))
    fmt = {"type": "json_object"}
    assert _content(_post(url, "hi", response_format=fmt)) == "Sure! Here is the JSON you asked for:"
    with pytest.raises(ValueError, match="must not exceed 1"):
        FaultPlan(rate_500=0.5, rate_invalid_output=0.6)


def test_structured_answer_cut_at_max_tokens(serve: Callable[..., str]) -> None:
    url = serve()
    response = _post(url, "one two three four", max_tokens=2, response_format={"type": "json_object"})
    assert response.json()["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(_content(response))
