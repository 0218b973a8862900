"""Metrics and reports of run directories produced by real runs, checked against independent arithmetic."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EXAMPLES, run_cli
from test_report import PLOT_NAMES, chromium, loaded_counts


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from parsl_chat.serve.simulated import FaultPlan, SimulatedServer

    out = tmp_path_factory.mktemp("analysis") / "run"
    with SimulatedServer(FaultPlan(latency_ms=30, jitter_ms=40, seed=5), startup_timeout_s=60) as server:
        result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--endpoint", server.url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_summary_matches_independent_arithmetic(example_run: Path) -> None:
    df = pd.read_parquet(example_run / "results.parquet")
    meta = json.loads((example_run / "run.json").read_text())
    summary = json.loads((example_run / "summary.json").read_text())
    wall = _ts(meta["finished_at"]) - _ts(meta["started_at"])
    ok = df[df.status == "ok"]
    assert summary["counts"]["prompts"] == len(df) == 30
    assert summary["counts"]["ok"] == len(ok)
    assert summary["wall_s"] == pytest.approx(wall, rel=1e-6)
    assert summary["throughput"]["prompts_per_s"] == pytest.approx(len(df) / wall, rel=1e-6)
    assert summary["throughput"]["completion_tokens_per_s"] == pytest.approx(ok.completion_tokens.sum() / wall, rel=1e-6)
    for q in (50, 95, 99):
        assert summary["latency_s"][f"p{q}"] == pytest.approx(np.percentile(ok.latency_s, q), rel=1e-6)
    assert summary["busy_agent_s"] == pytest.approx(df.latency_s.sum(), rel=1e-6)
    slots = sum(a["concurrency"] for a in meta["agents"])
    assert summary["agent_slots"] == meta["agent_slots"] == slots
    assert summary["parallel_efficiency"] == pytest.approx(df.latency_s.sum() / (slots * wall), rel=1e-6)
    per_agent = {a["agent"]: a["prompts"] for a in summary["agents"]}
    assert per_agent == df.agent.value_counts().to_dict()
    queue = summary["queue_s"]
    assert queue["p50"] == pytest.approx(np.percentile(df.queue_s, 50), rel=1e-6)
    # the report computes from the same code: its JSON is the summary
    shown = run_cli("report", str(example_run), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["parallel_efficiency"] == pytest.approx(summary["parallel_efficiency"])


def test_summary_json_is_what_load_run_gives(example_run: Path) -> None:
    # summary.json comes from the compact reader; the general path must agree on a real run
    from parsl_chat.analysis import load_run, summarize

    summary = json.loads((example_run / "summary.json").read_text())
    assert summary == json.loads(json.dumps(summarize(load_run(example_run))))


def test_example_report_renders_in_chromium(example_run: Path, tmp_path: Path) -> None:
    result = run_cli("report", str(example_run), "--html", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stderr
    assert "parallel efficiency" in result.stdout
    dom = chromium(tmp_path, "--dump-dom", (tmp_path / "report.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded, total = loaded_counts(dom.stdout)
    assert loaded == total and total >= len(PLOT_NAMES) - 1  # 'allocation' appears only with scheduler jobs
    for name in ("timeline", "inflight", "throughput", "latency_hist", "latency_cdf", "agents", "errors"):
        assert f'data-plot="{name}"' in dom.stdout


def test_report_on_real_failed_and_interrupted_runs(sim_server, tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    env = {"PARSL_CHAT_LIMITS_MAX_ATTEMPTS": "1"}
    dead = run_cli("run", str(prompts), "--endpoint", "http://127.0.0.1:9/v1", "--out", str(failed), "--no-parsl", env=env)
    assert dead.returncode == 1
    shown = run_cli("report", str(failed))
    assert shown.returncode == 0, shown.stderr
    assert "connection" in shown.stdout and "latency" in shown.stdout.lower()
    # a run killed before it wrote results: the report works from the ledger
    server = sim_server(latency_ms=10)
    partial = tmp_path / "partial"
    ok = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(partial), "--no-parsl")
    assert ok.returncode == 0
    for name in ("results.parquet", "results.csv", "summary.json"):
        (partial / name).unlink()
    meta = json.loads((partial / "run.json").read_text())
    meta.update(status="running", finished_at=None)
    (partial / "run.json").write_text(json.dumps(meta))
    shown = run_cli("report", str(partial), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["counts"]["prompts"] == 4
