"""The response cache written by two runs at once from both nodes of the dev SLURM cluster.

The two fake nodes share this machine's filesystem, as real nodes share NFS or Lustre:
eight Parsl worker processes (two runs x two nodes x two workers) write the same cache
directory at the same time, with no lock. Nothing may be lost or damaged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, clean_env, run_cli

from parsl_chat._processes import pid_alive
from parsl_chat.io import cache

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _prompts(path: Path, ids: range) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question number {i}"}) + "\n" for i in ids))
    return path


def _config(path: Path) -> Path:
    # one system prompt for both agents: a prompt's key does not depend on which agent answers it
    agent = {"system_prompt": "Be brief.", "params": {"temperature": 0}}
    path.write_text(
        json.dumps(
            {
                "agents": [{"name": "a1", **agent}, {"name": "a2", **agent}],
                "limits": {"concurrency": 4},
                "server": {"kind": "none"},
            }
        )
    )
    return path


def _writers_alive(store: Path, timeout_s: float) -> list[str]:
    """Wait for the processes that hold the cache's open segments to end; those still running at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = [int(name.split("-")[-2]) for name in os.listdir(store / "segments") if name.endswith(".open")]
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return [f"{pid}: {_proc_line(pid)}" for pid in alive]
        time.sleep(0.5)


def _proc_line(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "gone"
    return " ".join(line for line in status if line.startswith(("State", "PPid"))) + f" {cmdline}"


def _start(tmp_path: Path, name: str, ids: range, config: Path, url: str, store: Path, env: dict) -> subprocess.Popen[str]:
    prompts = _prompts(tmp_path / f"{name}.jsonl", ids)
    return subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", "run", str(prompts), "--profile", "slurm", "--config", str(config),
         "--endpoint", url, "--model", "sim", "--cache", str(store), "--out", str(tmp_path / name), "--quiet"],
        cwd=REPO, env={**clean_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_concurrent_runs_on_both_nodes_lose_no_entry(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=50)
    config = _config(tmp_path / "agents.yaml")
    store = tmp_path / "cache"
    runs = {"a": range(0, 600), "b": range(300, 900)}  # 300 prompts in common: both runs may answer them
    drivers = {name: _start(tmp_path, name, runs[name], config, server.url, store, slurm_cluster.env()) for name in runs}
    for name, driver in drivers.items():
        _, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, f"run {name}: {stderr}"
    frames = {name: pd.read_parquet(tmp_path / name / "results.parquet") for name in runs}
    for name, df in frames.items():
        assert (df.status == "ok").all() and len(df) == len(runs[name])
        assert set(df.node) == {"n1", "n2"}, f"run {name} did not use both nodes"
    a, b = frames["a"], frames["b"]
    assert a.started_at.min() < b.finished_at.max() and b.started_at.min() < a.finished_at.max()  # they overlapped

    figures = cache.stats(store)
    assert figures.damaged == 0 and figures.entries == 900
    assert figures.records == int(a.cached.eq(False).sum() + b.cached.eq(False).sum())  # every miss stored, once

    # every answer is there and intact: a third run, on another endpoint, sends nothing and gets the same answers
    everything = _prompts(tmp_path / "all.jsonl", range(900))
    other = sim_server(latency_ms=0)
    reader = run_cli(
        "run", str(everything), "--no-parsl", "--config", str(config), "--endpoint", other.url, "--model", "sim",
        "--cache", str(store), "--cache-mode", "read", "--out", str(tmp_path / "check"),
    )  # fmt: skip
    assert reader.returncode == 0, reader.stderr
    assert other.requests() == []
    check = pd.read_parquet(tmp_path / "check" / "results.parquet").set_index("custom_id")
    assert check.cached.all()
    answered = pd.concat([a, b]).drop_duplicates("custom_id").set_index("custom_id")
    pd.testing.assert_series_equal(check.response.sort_index(), answered.response.sort_index())

    # the workers' last segments were left open (Parsl ends workers without atexit): their processes
    # are gone, so compaction takes them now, without waiting for --idle-s
    assert figures.files["open"] > 0
    # the drivers have ended, but SLURM ends their jobs' worker processes a moment later (CG state)
    assert not slurm_clean.wait_queue_empty(120), slurm_clean.squeue_detail()
    assert not (writers := _writers_alive(store, 60)), f"workers still running after their jobs ended: {writers}"
    compacted = run_cli("cache", "compact", str(store))
    assert compacted.returncode == 0 and "900 entries" in compacted.stdout, compacted.stdout + compacted.stderr
    after = cache.stats(store)
    assert (after.entries, after.records, after.damaged) == (900, 900, 0)
    assert after.files == {"open": 0, "sealed": 0, "compacted": 1}
