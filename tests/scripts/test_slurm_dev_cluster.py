"""Real tests of scripts/slurm-dev-cluster: a two-node SLURM cluster (n1, n2) on this machine.

Needs root (the fixture installs slurm-wlm + munge when missing). Whole module: ~30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.slurm import SCRIPT, SlurmCluster

pytestmark = pytest.mark.slurm


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd="/")


def wait_until(pred, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    out = cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip()
    return out  # "" once the job has left the queue


def pid_files(cluster: SlurmCluster) -> dict:
    run_dir = Path(cluster.conf).parent / "run"
    return {p.name: p.read_text().strip() for p in sorted(run_dir.glob("slurm*.pid"))}


def test_usage_on_bad_arguments():
    for args in ([], ["bogus"], ["start", "extra"]):
        proc = script(*args)
        assert proc.returncode == 2, (args, proc)
        assert "usage: slurm-dev-cluster {start|stop|status|env" in proc.stderr


def test_env_prints_slurm_conf(slurm_cluster):
    proc = script("env")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"export SLURM_CONF={slurm_cluster.conf}"


def test_start_is_idempotent(slurm_cluster):
    before = pid_files(slurm_cluster)
    assert set(before) == {"slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid"}
    t0 = time.monotonic()
    proc = script("start")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 10
    assert "slurm dev cluster up" in proc.stdout
    assert "n1 idle" in proc.stdout and "n2 idle" in proc.stdout
    assert pid_files(slurm_cluster) == before, "start on a running cluster must not restart daemons"


def test_plain_sinfo_shows_both_nodes_idle(slurm_cluster):
    # Without SLURM_CONF: the script links /etc/slurm/slurm.conf (Debian's default) to its config.
    assert os.path.realpath("/etc/slurm/slurm.conf") == os.path.realpath(slurm_cluster.conf)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %P %t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = sorted(line.split() for line in out.splitlines())
    assert rows == [["n1", "debug*", "idle"], ["n2", "debug*", "idle"]]
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}


def test_status_exit_code_when_up(slurm_cluster):
    proc = script("status")
    assert proc.returncode == 0, proc
    assert "n1" in proc.stdout and "n2" in proc.stdout
    assert "slurm dev cluster up" in proc.stdout


def test_sbatch_two_nodes_runs_on_n1_and_n2(slurm_clean, tmp_path):
    out_file = tmp_path / "job-%j.out"
    env = slurm_clean.env()
    env["PARSL_CHAT_SLURM_MARK"] = "inherited-42"  # the job must see the submitter's environment
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-N2",
            "-t",
            "1",
            "-o",
            str(out_file),
            "--wrap",
            'srun -l bash -c "echo node=\\$SLURMD_NODENAME"; '
            "echo mark=$PARSL_CHAT_SLURM_MARK; echo user=$(id -un); echo py=$(command -v python3)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), proc.stdout
    assert wait_until(lambda: job_state(slurm_clean, job_id) == "", timeout=30), (
        f"job {job_id} still queued: {slurm_clean.squeue_detail()}"
    )
    text = Path(str(out_file).replace("%j", job_id)).read_text()
    lines = text.splitlines()
    assert "0: node=n1" in lines and "1: node=n2" in lines, text
    assert "mark=inherited-42" in lines, text
    assert "user=root" in lines, text
    py = next(line for line in lines if line.startswith("py="))
    assert py != "py=", text


def test_srun_two_nodes_reports_both_node_names(slurm_clean):
    proc = slurm_clean.run("srun", "-N2", "-t", "1", "bash", "-c", "echo $SLURMD_NODENAME", timeout=60)
    assert sorted(proc.stdout.split()) == ["n1", "n2"], proc


WHERE_APP_SOURCE = """
def where(i, delay=0.0):
    import os
    import time

    time.sleep(delay)
    return i, os.environ["SLURMD_NODENAME"], os.environ["SLURM_JOB_ID"]
"""


@pytest.mark.slow
def test_parsl_slurm_provider_spans_both_nodes(slurm_clean, tmp_path):
    import parsl
    from parsl.app.app import python_app
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider

    class FastPollSlurmProvider(SlurmProvider):
        """SlurmProvider polls every 60 s; a test needs seconds."""

        @property
        def status_polling_interval(self) -> int:
            return 1

    htex = HighThroughputExecutor(
        label="htex_slurm",
        address="127.0.0.1",
        max_workers_per_node=2,
        provider=FastPollSlurmProvider(
            partition=slurm_clean.partition,
            nodes_per_block=2,
            init_blocks=1,
            min_blocks=0,
            max_blocks=1,
            walltime="00:05:00",
            launcher=SrunLauncher(),
            # The job inherits this process's environment; putting the interpreter's bin/ first
            # makes the nodes run process_worker_pool.py from the same Python as this test.
            worker_init=f'export PATH="{Path(sys.executable).parent}:$PATH"',
            cmd_timeout=30,
        ),
    )
    config = Config(executors=[htex], strategy_period=1, run_dir=str(tmp_path / "runinfo"))

    # The workers cannot import this test module (its name depends on pytest's import mode), so
    # the app is made in a bare namespace: serialized by value, with no module globals to drag along.
    namespace: dict = {"__name__": "__main__"}
    exec(WHERE_APP_SOURCE, namespace)
    where = python_app(namespace["where"], executors=["htex_slurm"])

    t0 = time.monotonic()
    dfk = parsl.load(config)
    try:
        first = where(-1).result(timeout=120)
        t_first = time.monotonic() - t0
        # Both nodes' managers connect (one per node, srun -N2); then spread tasks over both.
        managers = wait_until(lambda: len(htex.connected_managers()) >= 2, timeout=60)
        assert managers, f"only {htex.connected_managers()} connected"
        results = [f.result(timeout=60) for f in [where(i, 0.5) for i in range(8)]]
        t_all = time.monotonic() - t0
    finally:
        dfk.cleanup()
        parsl.clear()
    nodes = {node for _, node, _ in results} | {first[1]}
    jobs = {job for _, _, job in results} | {first[2]}
    print(f"parsl: first result {t_first:.1f} s after load, 9 results {t_all:.1f} s, nodes {sorted(nodes)}")
    assert sorted(r[0] for r in results) == list(range(8))
    assert nodes == {"n1", "n2"}
    assert len(jobs) == 1, f"expected one SLURM block spanning both nodes, got jobs {jobs}"
    # dfk.cleanup() cancels the block: the queue drains (slurm_clean asserts it too).
    left = slurm_clean.wait_queue_empty(30)
    assert not left, f"block not cancelled by dfk.cleanup(): {slurm_clean.squeue_detail()}"


def test_stop_cancels_running_job_then_start_restores(slurm_clean):
    job_id = (
        slurm_clean.run("sbatch", "--parsable", "-N1", "-t", "5", "-o", "/dev/null", "--wrap", "sleep 300")
        .stdout.strip()
        .split(";")[0]
    )
    assert wait_until(lambda: job_state(slurm_clean, job_id) == "RUNNING", timeout=30), slurm_clean.squeue_detail()
    try:
        t0 = time.monotonic()
        stop = script("stop")
        t_stop = time.monotonic() - t0
        assert stop.returncode == 0, stop
        assert f"cancelling jobs: {job_id}" in stop.stderr
        assert t_stop < 30
        status = script("status")
        assert status.returncode == 3, status
        assert "down" in status.stdout
        again = script("stop")  # idempotent
        assert again.returncode == 0, again
    finally:
        start = script("start")
    assert start.returncode == 0, start
    assert slurm_clean.node_states() == {"n1": "idle", "n2": "idle"}
    assert slurm_clean.squeue_jobs() == []  # slurmctld -c: nothing comes back
