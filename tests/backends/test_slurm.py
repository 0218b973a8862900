"""parsl-chat on the real two-node dev SLURM cluster (scripts/slurm-dev-cluster).

Every test here submits real jobs to slurmctld; rows must come from both fake
nodes (n1, n2) and no job may be left in the queue afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import EXAMPLES, REPO, assert_figures_within_bounds, clean_env, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _prompts(path: Path, n: int, prefix: str = "q") -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"question number {i}"}) + "\n" for i in range(n)))
    return path


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_from_login_node_uses_both_nodes(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=50)
    out = tmp_path / "run"
    result = run_cli(
        "run", str(EXAMPLES / "prompts.jsonl"), "--profile", "slurm", "--endpoint", server.url, "--out", str(out),
        env=slurm_cluster.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and len(df) == 30
    assert set(df.node) == {"n1", "n2"}
    assert df.job_id.notna().all() and df.job_id.nunique() == 1
    assert df.block.notna().all()
    meta = json.loads((out / "run.json").read_text())
    assert meta["blocks"][0]["job_id"] == df.job_id.iloc[0] and meta["blocks"][0]["ended_at"]
    assert set(meta["blocks"][0]["nodes"]) == {"n1", "n2"}
    summary = json.loads((out / "summary.json").read_text())
    alloc = summary["allocation"]
    assert alloc["job_ids"] == [df.job_id.iloc[0]] and set(alloc["nodes"]) == {"n1", "n2"}
    assert alloc["node_s_allocated"] >= alloc["node_s_busy"] > 0
    assert_figures_within_bounds(summary)
    assert slurm_cluster.wait_queue_empty() == []


def test_dry_run_prints_the_plan(slurm_cluster) -> None:
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--profile", "slurm", "--endpoint", "http://x/v1", "--dry-run")
    assert result.returncode == 0, result.stderr
    text = result.stderr + result.stdout
    assert "executor: slurm, partition debug" in text
    assert "2 node(s) per block; 2 workers per node (up to 4 workers)" in text
    assert "prompts: 30 valid" in text


def test_sbatch_job_script_runs_on_both_nodes(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=20)
    out = tmp_path / "run"
    env = {**slurm_cluster.env(), "PARSL_CHAT_ARGS": f"--endpoint {server.url} --model sim"}
    job = subprocess.run(
        ["sbatch", "--parsable", "-N2", "-o", str(tmp_path / "job-%j.out"),
         "jobs/chat_batch.sh", "examples/prompts.jsonl", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    _wait_for(lambda: job not in slurm_cluster.squeue_jobs(), 180, f"job {job} to finish")
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "30 prompts, 30 ok" in log, log
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.node) == {"n1", "n2"} and set(df.job_id) == {job}
    assert_figures_within_bounds(json.loads((out / "summary.json").read_text()))  # the slurm-allocation profile


def test_killed_driver_leaves_a_job_that_cleanup_cancels(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=500)
    out = tmp_path / "run"
    prompts = _prompts(tmp_path / "p.jsonl", 400)
    env = clean_env()
    driver = subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", "run", str(prompts), "--profile", "slurm",
         "--endpoint", server.url, "--out", str(out)],
        cwd=REPO, env={**env, **slurm_cluster.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / "ledger.jsonl").exists() and (out / "ledger.jsonl").stat().st_size > 0, 120, "first results")
        job_ids = [b["job_id"] for b in json.loads((out / "run.json").read_text())["blocks"]]
        assert job_ids and all(job_ids)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert set(job_ids) <= set(slurm_cluster.squeue_jobs())  # the block outlived its driver
    result = run_cli("cleanup", str(out))
    assert result.returncode == 0, result.stderr
    assert f"cancelled SLURM job(s): {', '.join(job_ids)}" in result.stdout
    assert slurm_cluster.wait_queue_empty() == []
    again = run_cli("cleanup", str(out))
    assert "nothing to cancel" in again.stdout


def test_walltime_stops_cleanly_and_continuation_finishes(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    # 200 prompts at 2 s each over 12 slots (3 agents x 4 workers): ~35 s of work in a 60 s job told to stop 35 s before its end;
    # SLURM's own warning signal is moved to 5 s before the end (the script's @300 would fire at once)
    server = sim_server(latency_ms=2000, log_path=str(tmp_path / "requests.jsonl"))
    prompts = _prompts(tmp_path / "p.jsonl", 200)
    out = tmp_path / "run"
    env = {
        **slurm_cluster.env(),
        "PARSL_CHAT_ARGS": f"--endpoint {server.url} --model sim",
        "PARSL_CHAT_WALLTIME_MARGIN_S": "35",
        "PARSL_CHAT_MAX_RESUBMIT": "3",
    }
    first = subprocess.run(
        ["sbatch", "--parsable", "-N2", "--time=1", "--signal=B:USR1@5", "-o", str(tmp_path / "job-%j.out"),
         "jobs/chat_batch.sh", str(prompts), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip

    def finished() -> bool:
        meta = out / "run.json"
        return meta.exists() and json.loads(meta.read_text()).get("status") == "complete" and not slurm_cluster.squeue_jobs()

    _wait_for(finished, 240, "the run to complete through continuation jobs")
    logs = sorted(tmp_path.glob("job-*.out"))
    first_log = (tmp_path / f"job-{first}.out").read_text()
    assert "run stopped (walltime)" in first_log and "continuation job" in first_log, first_log
    # SLURM may send a --signal warning up to 60 s early (sbatch(1)), so in a 1-minute job the
    # continuation can itself be told to stop and need another: more than one continuation is allowed.
    assert len(logs) >= 2
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 200 and df.custom_id.is_unique and (df.status == "ok").all()
    assert df.job_id.nunique() >= 2  # answered across the first job and its continuation
    answered = [r["prompt"] for r in server.requests() if r["status"] == 200]
    assert len(answered) == len(set(answered)), "a prompt already recorded was sent again"


def test_blocks_scale_out_while_work_is_queued(slurm_cluster, slurm_clean, sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=200)
    profile = tmp_path / "scaling.yaml"
    profile.write_text(
        "executor: slurm\npartition: debug\nnodes_per_block: 1\ninit_blocks: 1\nmin_blocks: 0\nmax_blocks: 2\n"
        "workers: 2\nwalltime: '00:10:00'\nstrategy: simple\nstrategy_period_s: 1\nstatus_polling_s: 1\n"
    )
    out = tmp_path / "run"
    result = run_cli("run", str(_prompts(tmp_path / "p.jsonl", 300)), "--profile", str(profile), "--endpoint", server.url,
                     "--out", str(out), env=slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    blocks = json.loads((out / "run.json").read_text())["blocks"]
    assert len(blocks) == 2 and len({b["job_id"] for b in blocks}) == 2  # Parsl added a second block for the queue
    assert all(b["submitted_at"] and b["ended_at"] for b in blocks)
    df = pd.read_parquet(out / "results.parquet")
    assert df.job_id.nunique() == 2  # both blocks did work (SLURM may pack both on one node)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["allocation"]["blocks"]) == 2
    assert slurm_cluster.wait_queue_empty() == []


def _server_config(tmp_path: Path, command: str, ready_timeout_s: float = 30) -> Path:
    config = tmp_path / "agents.yaml"
    config.write_text(
        "agents:\n  - name: analyst\n  - name: teacher\nlimits:\n  concurrency: 4\n"
        f"server:\n  kind: command\n  command: {json.dumps(command)}\n  model: sim\n  ready_path: /health\n"
        f"  ready_timeout_s: {ready_timeout_s}\n"
    )
    return config


def test_each_node_starts_its_own_model_server(slurm_cluster, slurm_clean, tmp_path: Path) -> None:
    command = f"{sys.executable} -m parsl_chat.serve.simulated --host {{host}} --port {{port}} --latency-ms 20 --model {{model}}"
    out = tmp_path / "run"
    config = _server_config(tmp_path, command)
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--profile", "slurm", "--config", str(config),
                     "--out", str(out), env=slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and set(df.node) == {"n1", "n2"}
    # one server per node: each node's rows went to its own endpoint, and the two differ
    per_node = df.groupby("node").endpoint.unique()
    assert all(len(endpoints) == 1 for endpoints in per_node)
    assert per_node["n1"][0] != per_node["n2"][0]
    assert slurm_cluster.wait_queue_empty() == []


def test_a_node_server_killed_mid_run_is_restarted_and_every_prompt_ends_ok(slurm_cluster, slurm_clean, tmp_path: Path) -> None:
    # each node's server logs its requests to a file of its own port; a restart keeps the port
    logs = tmp_path / "requests"
    logs.mkdir()
    command = (f"{sys.executable} -m parsl_chat.serve.simulated --host {{host}} --port {{port}} --latency-ms 40 "
               f"--model {{model}} --log-path {logs}/{{port}}.jsonl")  # fmt: skip
    out = tmp_path / "run"
    config = _server_config(tmp_path, command)
    driver = subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", "run", str(_prompts(tmp_path / "p.jsonl", 400)), "--profile", "slurm",
         "--config", str(config), "--out", str(out)],
        cwd=REPO, env=clean_env(slurm_cluster.env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    ledger = out / "ledger.jsonl"
    _wait_for(lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 40, 180, "40 answers")
    servers = [p for p in psutil.process_iter(["cmdline"]) if str(logs) in " ".join(p.info["cmdline"] or [])]
    assert servers, "no node server found"
    servers[0].kill()
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 400 and df.custom_id.is_unique and (df.status == "ok").all()
    crash_logs = list((out / "logs").glob("model-server-n*-crash-1.log"))
    assert len(crash_logs) == 1, crash_logs
    answered = [json.loads(line)["prompt"] for path in logs.glob("*.jsonl") for line in path.read_text().splitlines()
                if json.loads(line)["status"] == 200]  # fmt: skip
    assert len(answered) == len(set(answered)) == 400  # none answered twice
    assert_figures_within_bounds(json.loads((out / "summary.json").read_text()))
    assert slurm_cluster.wait_queue_empty() == []


def test_a_node_server_that_never_starts_names_the_node(slurm_cluster, slurm_clean, tmp_path: Path) -> None:
    command = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    out = tmp_path / "run"
    config = _server_config(tmp_path, command)
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--profile", "slurm", "--config", str(config),
                     "--out", str(out), env=slurm_cluster.env(), timeout=180)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "exited with status 3" in result.stderr, result.stderr
    assert "on node n1" in result.stderr or "on node n2" in result.stderr
    assert slurm_cluster.wait_queue_empty() == []


@pytest.mark.parametrize(
    ("log", "job_id", "pattern"),
    [
        ("/tmp/pytest-14/t0/job-4.out", "4", "/tmp/pytest-14/t0/job-%j.out"),  # CI: the directory's digits stay
        ("/home/u/parsl-chat-123.out", "123", "/home/u/parsl-chat-%j.out"),
        ("/home/u/run-1234.out", "123", "/home/u/run-1234.out"),  # not a whole number: left as is (appended to)
        ("/scratch/5/5.log", "5", "/scratch/5/%j.log"),
    ],
)
def test_continuation_log_pattern(log: str, job_id: str, pattern: str) -> None:
    # the function chat_batch.sh uses to give a continuation job the same log naming
    assert _job_script_function("output_pattern", log, job_id) == pattern


@pytest.mark.parametrize(
    ("limit", "offset"),
    [("00:01:00", "15"), ("1:00", "15"), ("00:10:00", "150"), ("30", "300"), ("2-00:00:00", "300"), ("UNLIMITED", "300")],
)
def test_continuation_warning_signal_fits_its_time_limit(limit: str, offset: str) -> None:
    assert _job_script_function("warning_offset", limit) == offset


def _job_script_function(name: str, *args: str) -> str:
    """Call one of jobs/chat_batch.sh's shell functions (with the functions it uses) and return its output."""
    script = (REPO / "jobs" / "chat_batch.sh").read_text()
    functions = []
    for part in ("limit_seconds", "warning_offset", "output_pattern"):
        body = script[script.index(f"{part}() {{") :]
        functions.append(body[: body.index("\n}\n") + 3])
    call = "\n".join(functions) + f'\n{name} "$@"'
    shown = subprocess.run(["bash", "-c", call, "-", *args], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.strip()


@pytest.mark.model
def test_each_node_serves_the_embedded_model_with_parallel_slots(slurm_cluster, slurm_clean, tmp_path: Path) -> None:
    """Per-node embedded servers on llama-server: each node generates several requests at once.

    The proof is in the results alone: llama-server's per-response timings say when each
    request's generation ran (its last ``server_prompt_s + server_generation_s`` before it
    finished); a server with one slot can never have two of them overlap.
    """
    from parsl_chat.core.llama_build import find_llama_build

    build, why = find_llama_build()
    if build is None:
        pytest.skip(f"llama-server unavailable: {why}")
    config = tmp_path / "agents.yaml"
    config.write_text(
        "agents:\n"
        "  - {name: analyst, system_prompt: Be brief., params: {temperature: 0.0, max_tokens: 32}}\n"
        "  - {name: teacher, system_prompt: Be brief., params: {temperature: 0.0, max_tokens: 32}}\n"
        "limits:\n  timeout_s: 300\n"  # concurrency unset: the agents share each node's slots
        "server:\n  kind: embedded\n  engine: llama-server\n  ready_timeout_s: 120\n"
    )
    out = tmp_path / "run"
    result = run_cli("run", str(_prompts(tmp_path / "prompts.jsonl", 32)), "--profile", "slurm", "--config", str(config),
                     "--out", str(out), env=slurm_cluster.env(), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and len(df) == 32 and set(df.node) == {"n1", "n2"}
    assert df.server_generation_s.notna().all(), "no per-response timings: not llama-server"
    for node, rows in df.groupby("node"):
        finished = rows.finished_at.astype("int64").to_numpy() / 1e6
        began = finished - (rows.server_prompt_s + rows.server_generation_s).to_numpy()
        events = sorted([(t, 1) for t in began] + [(t, -1) for t in finished])
        at_once = max(np.cumsum([step for _, step in events]))
        assert at_once >= 2, f"node {node} never generated two requests at once: one slot"
    assert slurm_cluster.wait_queue_empty() == []
