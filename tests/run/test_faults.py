"""Agents against flaky endpoints: retries, timeouts, classification, routing by load."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("backend", ["parsl", "no-parsl"])
def test_flaky_endpoint_every_prompt_ends_ok(backend: str, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=10, rate_500=0.10, rate_429=0.05, retry_after_s=0.2, rate_hang=0.02, seed=11)
    out = tmp_path / "run"
    config = tmp_path / "agents.yaml"
    config.write_text("limits:\n  concurrency: 4\n  timeout_s: 1.5\n  max_attempts: 8\n  backoff_s: 0.05\n  backoff_max_s: 0.5\n")
    flag = ["--no-parsl"] if backend == "no-parsl" else []
    result = run_cli("run", str(_prompts(tmp_path / "p.jsonl", 200)), "--config", str(config), "--endpoint", server.url,
                     "--out", str(out), *flag, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 200 and (df.status == "ok").all() and df.custom_id.is_unique
    assert (df.attempts > 1).sum() >= 20  # ~17% of first attempts fail: retries happened and were counted
    log = server.requests()
    statuses = {r["status"] for r in log}
    assert {500, 429, "hang"} <= statuses
    # every 429 was honoured: the next attempt of that prompt came at least Retry-After later
    by_prompt: dict[str, list[dict]] = {}
    for r in log:
        by_prompt.setdefault(r["prompt"], []).append(r)
    for attempts in by_prompt.values():
        attempts.sort(key=lambda r: r["t"])
        for first, second in itertools.pairwise(attempts):
            if first["status"] == 429:
                assert second["t"] - first["t"] >= 0.19
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["retried"] == int((df.attempts > 1).sum())


def test_transient_failures_give_up_after_max_attempts(sim_server, tmp_path: Path) -> None:
    server = sim_server(rate_500=1.0)
    config = tmp_path / "agents.yaml"
    config.write_text("limits:\n  max_attempts: 3\n  backoff_s: 0.01\n")
    out = tmp_path / "run"
    result = run_cli("run", str(_prompts(tmp_path / "p.jsonl", 4)), "--config", str(config), "--endpoint", server.url,
                     "--out", str(out), "--no-parsl")  # fmt: skip
    assert result.returncode == 1
    df = pd.read_parquet(out / "results.parquet")
    assert (df.error_type == "server_error").all() and (df.attempts == 3).all()
    assert len(server.requests()) == 12
    assert "server_error: 4" in result.stderr


@pytest.mark.parametrize(
    ("marker", "error_type"),
    [("__bad_request__", "bad_request"), ("__auth__", "auth"), ("__context_length__", "context_length")],
)
def test_permanent_failures_are_not_retried(marker: str, error_type: str, sim_server, tmp_path: Path) -> None:
    server = sim_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "bad", "prompt": f"{marker} x"}) + "\n" + json.dumps({"id": "good", "prompt": "fine"}) + "\n"
    )
    out = tmp_path / "run"
    result = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(out), "--no-parsl", "--max-failures", "1")
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet").set_index("custom_id")
    assert df.loc["bad", "error_type"] == error_type and df.loc["bad", "attempts"] == 1
    assert df.loc["good", "status"] == "ok"
    assert len(server.requests()) == 2


def test_dropped_connections_are_retried(sim_server, tmp_path: Path) -> None:
    server = sim_server(rate_drop=0.3, seed=3)
    config = tmp_path / "agents.yaml"
    config.write_text("limits:\n  max_attempts: 10\n  backoff_s: 0.01\n")
    out = tmp_path / "run"
    result = run_cli("run", str(_prompts(tmp_path / "p.jsonl", 40)), "--config", str(config), "--endpoint", server.url,
                     "--out", str(out), "--no-parsl")  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and (df.attempts > 1).any()


def _fleet(tmp_path: Path, urls: list[str], routing: str) -> Path:
    config = tmp_path / f"{routing}.yaml"
    agents = "".join(f"  - name: agent{i}\n    endpoint: {url}\n    concurrency: 2\n" for i, url in enumerate(urls))
    config.write_text(f"agents:\n{agents}routing: {routing}\n")
    return config


def test_least_loaded_sends_fewer_prompts_to_a_slow_agent(sim_server, tmp_path: Path) -> None:
    fast_a, fast_b = sim_server(latency_ms=20), sim_server(latency_ms=20)
    slow = sim_server(latency_ms=100)  # 5x slower
    urls = [fast_a.url, fast_b.url, slow.url]
    prompts = _prompts(tmp_path / "p.jsonl", 150)
    counts = {}
    for routing in ("round_robin", "least_loaded"):
        out = tmp_path / routing
        result = run_cli("run", str(prompts), "--config", str(_fleet(tmp_path, urls, routing)), "--model", "sim",
                         "--out", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        df = pd.read_parquet(out / "results.parquet")
        assert len(df) == 150 and (df.status == "ok").all()
        counts[routing] = df.agent.value_counts().to_dict()
    assert counts["round_robin"] == {"agent0": 50, "agent1": 50, "agent2": 50}
    # with 5x the latency, its fair share of the work is ~1/11; allow generous slack, still far below 1/3
    assert counts["least_loaded"]["agent2"] <= 30, counts
    assert counts["least_loaded"]["agent0"] + counts["least_loaded"]["agent1"] >= 120


def test_pinned_prompts_stay_with_their_agent_under_least_loaded(sim_server, tmp_path: Path) -> None:
    fast, slow = sim_server(latency_ms=5), sim_server(latency_ms=50)
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": f"pin{i}", "prompt": "x", "agent": "agent1"} for i in range(10)]
    lines += [{"id": f"free{i}", "prompt": "y"} for i in range(30)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "run"
    result = run_cli("run", str(prompts), "--config", str(_fleet(tmp_path, [fast.url, slow.url], "least_loaded")),
                     "--out", str(out), "--no-parsl")  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet").set_index("custom_id")
    assert (df.loc[[f"pin{i}" for i in range(10)], "agent"] == "agent1").all()
