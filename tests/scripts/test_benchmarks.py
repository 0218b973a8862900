"""The benchmark scripts run and write sane figures (no timing thresholds: CI machines vary).

Runs ``benchmarks/run.py --quick`` on its fastest benchmarks and checks the
JSON and Markdown files it writes: every variant ran, every prompt was
answered, figures are positive and ratios are in range.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "fanout,routing",
         "--results", str(results), "--work", str(work)],
        capture_output=True, text=True, timeout=540, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def _load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"{name}.json not written"
    assert (results / f"{name}.md").is_file(), f"{name}.md not written"
    return json.loads(path.read_text())


def test_status_and_summary_are_written(quick_results: Path) -> None:
    status = json.loads((quick_results / "status.json").read_text())
    assert status["mode"] == "quick"
    assert status["fanout"]["status"] == "ok" and status["routing"]["status"] == "ok"
    summary = (quick_results / "summary.md").read_text()
    assert "## 1. Fan-out efficiency" in summary and "## 6. Routing" in summary


def test_fanout_figures_are_sane(quick_results: Path) -> None:
    data = _load(quick_results, "fanout")
    assert data["mode"] == "quick"
    assert data["machine"]["nproc"] >= 1 and data["machine"]["mem_total_gib"] > 0
    n, c = data["n"], data["concurrency"]
    assert c == 12 and data["ideal_makespan_s"] == pytest.approx(-(-n // c) * 0.1)
    expected = {
        "parsl-chat (Parsl HTEX)",
        "parsl-chat --no-parsl",
        "bare loop, openai client",
        "bare loop, aiohttp (floor)",
        "naive: one Parsl app per prompt",
    }
    assert set(data["summary"]) == expected
    for label, runs in data["runs"].items():
        assert runs, label
        for run in runs:
            assert run["rc"] == 0, (label, run.get("error"))
            assert run["wall_s"] > data["ideal_makespan_s"] * 0.9, label  # nothing beats the latency floor
            assert 0 < run["efficiency"] <= 1.1, label
            answered = run.get("rows", run.get("prompts"))
            assert answered == n and run.get("ok") == n, label
    for label in ("parsl-chat (Parsl HTEX)", "parsl-chat --no-parsl"):
        s = data["summary"][label]
        assert 0 < s["first_result_s"] < s["wall_s"]
        assert s["mean_latency_ms"] >= 100  # the server's fixed latency
        assert s["tail_s"] >= 0
    parsl_runs = data["runs"]["parsl-chat (Parsl HTEX)"]
    assert all(r["workers_seen"] >= 1 and r["maxrss_mb"] > 0 for r in parsl_runs)
    assert "| parsl-chat (Parsl HTEX) |" in (quick_results / "fanout.md").read_text()


def test_routing_figures_are_sane(quick_results: Path) -> None:
    data = _load(quick_results, "routing")
    n = data["n"]
    assert set(data["summary"]) == {"round_robin", "least_loaded"}
    for policy, runs in data["runs"].items():
        for run in runs:
            assert run["rc"] == 0, (policy, run.get("error"))
            assert sum(run["per_agent"].values()) == n
            assert set(run["per_agent"]) == {"a1", "a2", "a3"}
            assert 0 < run["slow_agent_share"] < 1
    rr = data["runs"]["round_robin"][0]["per_agent"]
    assert max(rr.values()) - min(rr.values()) <= 1  # round_robin splits evenly, whatever the speeds
    assert 0 < data["ideal_slow_agent_share"] < 1 / 3
    assert data["speedup_least_loaded"] > 0


@pytest.mark.model
def test_the_engines_benchmark_runs_both_engines_and_llama_batched_bench(tmp_path: Path) -> None:
    """BENCHMARKS.md §8 in quick mode (about 2.5 minutes): every run answered, every figure there."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "engines",
         "--results", str(results), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=540, cwd=REPO, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _load(results, "engines")
    assert "skipped" not in data, data.get("skipped")  # CI builds llama-server (scripts/install)
    assert data["plan"].startswith("llama-server") and data["slots"] >= 2
    quickstart = len((REPO / "examples" / "prompts.jsonl").read_text().splitlines())
    for variant, figures in data["summary"].items():
        assert figures["ok"] == (quickstart if variant.startswith("quickstart") else data["n"]), variant
        assert figures["tokens_per_s"] > 0 and figures["wall_s"] > 0, variant
    assert {"quickstart b/a tokens_per_s", "quickstart b/a prompts_per_s"} <= set(data["ratios"])
    assert all(ratio > 0 for figures in data["ratios"].values() for ratio in figures["runs"])
    assert data["batched_bench"] and all(row["tokens_per_s"] > 0 for row in data["batched_bench"])
