"""End-to-end runs of ``parsl-chat run`` against the simulated endpoint, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import EXAMPLES, run_cli

from parsl_chat.io.results import COLUMNS

RUN_FILES = (
    "config.yaml", "ledger.jsonl", "results.parquet", "results.csv", "output.jsonl", "errors.jsonl", "summary.json", "run.json"
)  # fmt: skip


def _ids(path: Path) -> set[str]:
    ids = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            ids.add(str(obj.get("custom_id") or obj.get("id") or f"line-{n}"))
    return ids


@pytest.mark.parametrize("backend", ["parsl", "no-parsl"])
def test_examples_run_end_to_end(backend: str, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=20)
    out = tmp_path / "run"
    args = ["run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", server.url, "--model", "sim", "--out", str(out)]
    if backend == "no-parsl":
        args.append("--no-parsl")
    # without warm start every row must come from a Parsl worker, proving the Parsl path
    result = run_cli(*args, env={"PARSL_CHAT_WARM_START": "0"})
    assert result.returncode == 0, result.stderr
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert (out / "logs" / "parsl-chat.log").is_file()
    df = pd.read_parquet(out / "results.parquet")
    assert tuple(df.columns) == COLUMNS
    assert sorted(df.custom_id) == sorted(_ids(EXAMPLES / "prompts.jsonl"))
    assert (df.status == "ok").all()
    assert set(df.agent) == {"analyst", "teacher", "summarizer"}
    assert df.response.str.startswith("sim").all()
    for col in ("submitted_at", "started_at", "finished_at", "queue_s", "latency_s", "hostname", "node", "worker"):
        assert df[col].notna().all(), col
    assert (df.finished_at >= df.started_at).all() and (df.started_at >= df.submitted_at).all()
    assert (df.latency_s >= 0.019).all()  # the server's 20 ms is inside every measured latency
    assert (df.prompt_tokens > 0).all() and (df.completion_tokens > 0).all()
    if backend == "parsl":
        assert df.block.notna().all() and df.worker.str.contains("/w").all()
    # the conversation ran in order on one agent, each turn carrying the history
    conv = df[df.conversation == "trip"].sort_values("turn")
    assert list(conv.turn) == [1, 2, 3] and conv.agent.nunique() == 1
    assert conv.started_at.is_monotonic_increasing
    # the pinned prompt went to its agent
    assert df.set_index("custom_id").loc["m01", "agent"] == "teacher"
    csv = pd.read_csv(out / "results.csv")
    assert tuple(csv.columns) == COLUMNS and len(csv) == len(df)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == len(df)
    # every request the server saw was one of ours, each prompt exactly once
    assert len(server.requests()) == len(df)


def test_parsl_and_in_process_agree(sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=5)
    frames = []
    for flag in ([], ["--no-parsl"]):
        out = tmp_path / ("a" if not flag else "b")
        result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", server.url, "--out", str(out), *flag)
        assert result.returncode == 0, result.stderr
        frames.append(pd.read_parquet(out / "results.parquet"))
    assert set(frames[0].custom_id) == set(frames[1].custom_id)
    # round-robin is decided in the driver: the same prompt goes to the same agent either way
    a = frames[0].set_index("custom_id").agent.sort_index()
    b = frames[1].set_index("custom_id").agent.sort_index()
    assert (a == b).all()


def test_warm_start_hands_over_to_parsl_workers(sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=100)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q {i}"}) + "\n" for i in range(600)))
    out = tmp_path / "run"
    result = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 600 and df.custom_id.is_unique and (df.status == "ok").all()
    parsl_rows = df.block.notna()
    assert parsl_rows.any() and (~parsl_rows).any()  # the driver answered first, Parsl's workers took over
    assert df[~parsl_rows].finished_at.max() <= df[parsl_rows].started_at.min()  # never both at once
    assert len(server.requests()) == 600  # drained chunks' unstarted prompts were sent once, by Parsl


def test_openai_batch_file_round_trips(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    batch = tmp_path / "batch.jsonl"
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8},
        }
        for i in range(7)
    ]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "run"
    result = run_cli("run", str(batch), "--endpoint", server.url, "--out", str(out), "--no-parsl")
    assert result.returncode == 0, result.stderr
    output = [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(7)]
    for o in output:
        assert set(o) == {"id", "custom_id", "response", "error"}
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 8  # max_tokens from the batch body reached the server
        assert body["choices"][0]["finish_reason"] == "length"


def test_bad_file_refused_and_nothing_sent(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\nnot json\n')
    result = run_cli("run", str(bad), "--endpoint", server.url, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}:2: field 'prompt': empty" in result.stderr
    assert f"{bad}:3: invalid JSON" in result.stderr
    assert server.requests() == []


def test_skip_invalid_records_bad_lines_as_error_rows(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": ""}\nnot json\n{"id": "a", "prompt": "dup"}\n')
    out = tmp_path / "run"
    result = run_cli("run", str(bad), "--endpoint", server.url, "--out", str(out), "--skip-invalid", "--max-failures", "3")
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet").set_index("line")
    assert df.loc[1, "status"] == "ok"
    assert set(df.loc[[2, 3, 4], "error_type"]) == {"invalid_input"}
    assert len(df) == 4 and len(server.requests()) == 1


def test_failures_beyond_max_failures_exit_1(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok one"}\n{"prompt": "__bad_request__ please"}\n{"prompt": "ok two"}\n')
    out = tmp_path / "run"
    result = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(out), "--no-parsl")
    assert result.returncode == 1
    assert "1 of 3 prompts failed (bad_request: 1)" in result.stderr
    # the first message of each error type, so the cause shows without opening results.csv
    assert "\n  bad_request: HTTP 400" in result.stderr, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    failed = df[df.status == "error"].iloc[0]
    assert failed.error_type == "bad_request" and failed.attempts == 1  # never retried
    # the Batch API's split: answers in output.jsonl, the failure in errors.jsonl with the endpoint's HTTP answer
    assert len((out / "output.jsonl").read_text().splitlines()) == 2
    [error] = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["custom_id"] == failed.custom_id and error["error"] is None
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "bad_request"
    assert error["response"]["body"]["error"]["message"] == "Bad request (simulated)."
    again = run_cli(
        "run", str(prompts), "--endpoint", server.url, "--out", str(tmp_path / "r2"), "--no-parsl", "--max-failures", "40%"
    )
    assert again.returncode == 0, again.stderr


def test_stdin_and_text_prompts(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    out = tmp_path / "run"
    result = run_cli(
        "run", "-", "--endpoint", server.url, "--out", str(out), "--no-parsl", input="first question\n\nsecond question\n"
    )
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df.custom_id) == ["line-1", "line-3"]
    txt = run_cli("run", str(EXAMPLES / "questions.txt"), "--endpoint", server.url, "--out", str(tmp_path / "t"), "--no-parsl")
    assert txt.returncode == 0, txt.stderr


def test_dry_run_sends_nothing(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", server.url, "--dry-run", "--agents", "4")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "prompts: 30 valid" in text and "agent analyst-2" in text and "executor: local" in text
    assert server.requests() == []


def test_unknown_pinned_agent_is_an_input_error(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "hi", "agent": "nobody"}\n')
    result = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert f"{prompts}:2: field 'agent': unknown agent 'nobody'" in result.stderr
    assert "analyst, teacher, summarizer" in result.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (
        ["run", str(tmp_path / "missing.jsonl")],
        ["run", str(EXAMPLES / "prompts.jsonl"), "--profile", "nope"],
        ["run"],
        ["run", str(EXAMPLES / "prompts.jsonl"), "--retry-failed"],
        ["validate", str(tmp_path)],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_existing_output_directory_is_refused(sim_server, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", "http://127.0.0.1:9/v1", "--out", str(out))
    assert result.returncode == 2
    assert "--resume" in result.stderr


def test_dead_endpoint_ends_in_error_rows_and_exit_1(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)))
    out = tmp_path / "run"
    env = {"PARSL_CHAT_LIMITS_MAX_ATTEMPTS": "2", "PARSL_CHAT_LIMITS_BACKOFF_S": "0.05"}
    result = run_cli(
        "run", str(prompts), "--endpoint", "http://127.0.0.1:9/v1", "--out", str(out), "--no-parsl", env=env, timeout=60
    )
    assert result.returncode == 1
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 5 and (df.error_type == "connection").all() and (df.attempts == 2).all()
    assert "connection: 5" in result.stderr


def test_secrets_never_written(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    config = tmp_path / "agents.yaml"
    config.write_text(f"agents:\n  - name: analyst\n    api_key: {secret}-agent\n  - name: teacher\nlimits:\n  concurrency: 2\n")
    out = tmp_path / "run"
    result = run_cli(
        "run", str(EXAMPLES / "prompts.jsonl"), "--config", str(config), "--endpoint", server.url, "--out", str(out),
        "--debug", env={"OPENAI_API_KEY": secret},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    shown = run_cli("config", "show", "--config", str(config), env={"OPENAI_API_KEY": secret})
    assert secret not in shown.stdout and "redacted" in shown.stdout


def test_config_show_lists_the_resolved_fleet(tmp_path: Path) -> None:
    secret = "sk-fleet-DO-NOT-LEAK-42"
    config = tmp_path / "agents.yaml"
    config.write_text(
        f"agents:\n  - name: analyst\n    api_key: {secret}\n    model: big\n"
        "  - name: teacher\n    endpoint: http://other:9000/v1\n"
    )
    shown = run_cli("config", "show", "--config", str(config), "--agents", "3", "--endpoint", "http://main:8000/v1")
    assert shown.returncode == 0, shown.stderr
    assert "routing: round_robin; 3 agents" in shown.stdout
    assert "agent analyst: model big, http://main:8000/v1, concurrency 4, weight 1, API key set" in shown.stdout
    assert "agent teacher: model default, http://other:9000/v1, concurrency 4, weight 1\n" in shown.stdout
    assert "agent analyst-2: model big, http://main:8000/v1" in shown.stdout  # --agents 3 cycles the two configured
    assert secret not in shown.stdout + shown.stderr


def test_a_signal_after_the_last_answer_still_ends_complete(sim_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch job's warning can arrive while results are written (seen in CI, during Parsl's
    # shutdown): the driver must finish writing, and with every prompt recorded the run is complete.
    import io
    import os
    import signal

    from rich.console import Console

    import parsl_chat.run as runner_mod
    import parsl_chat.run.pipeline as pipeline_mod

    server = sim_server()
    write = pipeline_mod.write_results

    def signalled_write(run_dir: Path) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return write(run_dir)

    monkeypatch.setattr(pipeline_mod, "write_results", signalled_write)  # where the finish looks it up
    out = tmp_path / "run"
    options = runner_mod.RunOptions(
        prompts=str(EXAMPLES / "prompts.jsonl"), out=out, no_parsl=True, quiet=True,
        cli_settings={"endpoint": server.url, "model": "sim"},
    )  # fmt: skip
    before = signal.getsignal(signal.SIGTERM)
    outcome = runner_mod.execute_run(options, Console(file=io.StringIO()))
    assert outcome.exit_code == 0
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert len(pd.read_parquet(out / "results.parquet")) == 30
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored once the results are written


def test_results_are_written_while_the_backend_shuts_down(sim_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Parsl's cleanup (longer where SLURM cancels blocks) overlaps writing the results files: the
    # blocks' end still reaches run.json, and an error in the shutdown still ends the run with it.
    import io
    import signal
    import time

    from rich.console import Console

    import parsl_chat.run as runner_mod
    from parsl_chat.backends.inprocess import InProcessBackend

    server = sim_server()
    shutdown = InProcessBackend.shutdown
    seen: dict[str, bool] = {}

    def slow_shutdown(self: InProcessBackend) -> None:
        results = out / "results.parquet"
        deadline = time.monotonic() + 20
        while not results.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["results_before_shutdown_ended"] = results.exists()
        shutdown(self)

    def options(out: Path) -> runner_mod.RunOptions:
        return runner_mod.RunOptions(
            prompts=str(EXAMPLES / "prompts.jsonl"), out=out, no_parsl=True, quiet=True,
            cli_settings={"endpoint": server.url, "model": "sim"},
        )  # fmt: skip

    out = tmp_path / "run"
    monkeypatch.setattr(InProcessBackend, "shutdown", slow_shutdown)
    outcome = runner_mod.execute_run(options(out), Console(file=io.StringIO()))
    assert outcome.exit_code == 0 and seen["results_before_shutdown_ended"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["blocks"] and all(b["ended_at"] for b in meta["blocks"])

    def failing_shutdown(self: InProcessBackend) -> None:
        shutdown(self)
        raise RuntimeError("cleanup failed")

    monkeypatch.setattr(InProcessBackend, "shutdown", failing_shutdown)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        runner_mod.execute_run(options(tmp_path / "failing"), Console(file=io.StringIO()))
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_start_of_a_run_does_not_import_pyarrow_or_pandas() -> None:
    # the end of the run imports them in a background thread once the first requests are out
    import subprocess
    import sys

    code = "import sys, parsl_chat.cli, parsl_chat.run; print(sorted({'pyarrow', 'pandas'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_run_ending_before_the_warm_start_hand_over_stops_parsl_at_once(sim_server, tmp_path: Path) -> None:
    # Every prompt is answered in-process while Parsl's worker pool is still starting (held back
    # a minute here): the run must not wait for it, and must leave none of Parsl's processes behind.
    import time
    import uuid

    import psutil

    server = sim_server()
    out = tmp_path / "run"
    # what the driver starts inherits both (the interchange renames itself, which hides its environment)
    token, cwd = f"warm-start-test-{uuid.uuid4().hex}", tmp_path / "cwd"
    cwd.mkdir()
    began = time.monotonic()
    result = run_cli(
        "run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", server.url, "--model", "sim", "--out", str(out),
        env={"PARSL_CHAT_WORKER_INIT": "sleep 61.5", "WARM_START_TEST_TOKEN": token}, timeout=180, cwd=cwd,
    )  # fmt: skip
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 30 and df.block.isna().all()  # all answered before any Parsl worker was up
    assert took < 30, f"the run took {took:.1f} s: it waited for Parsl's workers"
    # 30 prompts are a few chunks, all sent at once: Parsl is stopped as soon as the last one is out
    assert "every chunk runs in this process; stopping Parsl's start" in (out / "logs" / "parsl-chat.log").read_text()

    def left_behind() -> list[str]:
        found = []
        for proc in psutil.process_iter(["status", "cmdline"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if proc.environ().get("WARM_START_TEST_TOKEN") == token or proc.cwd() == str(cwd):
                    found.append(" ".join(proc.info["cmdline"] or [])[:120])
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 15  # a killed process may take a moment to go
    while left_behind() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left_behind() == []  # no interchange, worker pool, or its start-up script


def test_the_end_of_run_imports_start_once_the_driver_is_idle() -> None:
    import time

    from parsl_chat.run.finish import Preload

    preload = Preload(("json",))
    preload.start_if_idle()  # the first turn only starts measuring
    assert preload._thread is None
    time.sleep(preload.WINDOW_S + 0.1)  # an idle driver: requests wait on the endpoint or on Parsl's workers
    preload.start_if_idle()
    assert preload._thread is not None
    preload.wait()
