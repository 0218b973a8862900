"""backends/targets: one module per execution target, behind one registry that agrees with config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from parsl_chat.backends.cleanup import cleanup_run
from parsl_chat.backends.targets import TARGETS, target_for, total_workers
from parsl_chat.config import EXECUTORS, PROFILES, BaseProfile, ProfileConfig, executors_taking, own_keys, profile_class
from parsl_chat.errors import ConfigError, ExecutorError
from parsl_chat.io.rundir import write_run_meta

PACKAGE = Path(__file__).resolve().parents[2] / "parsl_chat"


def test_every_executor_in_config_has_a_target_and_no_other() -> None:
    assert list(TARGETS) == list(EXECUTORS)
    assert all(target.name == name for name, target in TARGETS.items())


def test_each_target_takes_the_keys_its_profile_class_adds() -> None:
    for name, target in TARGETS.items():
        own = profile_class(name)
        assert own is not None and name == own.EXECUTOR
        assert target.keys == own_keys(own), name
        assert all(executors_taking(key) == (name,) for key in target.keys), name
    fields = {f.name for f in dataclasses.fields(ProfileConfig)}
    assert all(set(t.keys) <= fields for t in TARGETS.values())


def test_the_profile_config_has_every_profile_classes_keys_and_no_other() -> None:
    """ProfileConfig is the union of the per-target classes: base keys first, then each target's in order."""
    expected = [f.name for f in dataclasses.fields(BaseProfile)]
    for cls in PROFILES:
        expected += own_keys(cls)
    assert [f.name for f in dataclasses.fields(ProfileConfig)] == expected
    assert profile_class("pbs") is None
    assert executors_taking("workers") == EXECUTORS


def test_target_for_follows_the_profiles_executor() -> None:
    for name, target in TARGETS.items():
        assert target_for(ProfileConfig(executor=name)) is target
    with pytest.raises(ConfigError, match="unknown executor 'pbs'"):
        target_for(ProfileConfig(executor="pbs"))


def test_only_local_workers_run_on_the_driver_and_warm_start() -> None:
    assert [n for n, t in TARGETS.items() if t.workers_on_driver] == ["local"]
    assert [n for n, t in TARGETS.items() if t.warm_start] == ["local"]
    assert [n for n, t in TARGETS.items() if t.local_blocks] == ["local", "slurm-allocation"]
    assert [n for n, t in TARGETS.items() if t.worker_logdir] == ["kubernetes"]


def test_plan_lines_and_workers_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    local = ProfileConfig(executor="local", workers=3)
    assert target_for(local).plan_lines(local) == [
        "executor: local (Parsl HighThroughputExecutor on this machine), 3 worker processes"
    ]
    assert total_workers(local) == 3
    slurm = ProfileConfig(
        executor="slurm", workers=4, partition="debug", account="acme", nodes_per_block=2, max_blocks=3, walltime="00:30:00"
    )
    assert target_for(slurm).plan_lines(slurm) == [
        "executor: slurm, partition debug, account acme, walltime 00:30:00",
        "blocks: init 1, min 0, max 3; 2 node(s) per block; 4 workers per node (up to 24 workers)",
    ]
    assert total_workers(slurm) == 24
    inside = ProfileConfig(executor="slurm-allocation", workers=5, max_blocks=4)
    assert target_for(inside).plan_lines(inside) == [
        "executor: slurm-allocation (inside job 77): 1 block of 3 node(s), 5 workers per node, no further submission"
    ]
    assert total_workers(inside) == 15  # one block, whatever max_blocks says
    pods = ProfileConfig(executor="kubernetes", workers=2, max_blocks=4, nodes_per_block=2)
    assert target_for(pods).plan_lines(pods) == [
        "executor: kubernetes, namespace default, image python:3.11-slim",
        "blocks (pods): init 1, max 4; 2 workers per pod; pod cpu 1, memory 1Gi",
    ]
    assert total_workers(pods) == 16


def test_an_allocation_outside_a_slurm_job_is_an_executor_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ExecutorError, match="no SLURM allocation was found"):
        total_workers(ProfileConfig(executor="slurm-allocation"))


def test_job_ids_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert TARGETS["local"].job_id("4242") is None
    assert TARGETS["slurm-allocation"].job_id("4242") == "77"
    assert TARGETS["slurm"].job_id("4242") == "4242"
    assert TARGETS["kubernetes"].job_id("run.aaaa0001") == "run.aaaa0001"


def test_targets_without_scheduler_jobs_cancel_nothing(tmp_path: Path) -> None:
    assert TARGETS["local"].cancel({}) is None
    assert TARGETS["slurm-allocation"].cancel({}) is None
    write_run_meta(tmp_path, {"run_id": "r", "executor": "local", "blocks": [], "processes": []})
    assert cleanup_run(tmp_path) == [
        "nothing to clean up: no process of this run is left (executor 'local' starts no scheduler jobs)"
    ]


def test_slurm_cleanup_without_squeue_says_nothing_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    meta = {"run_id": "r", "executor": "slurm", "blocks": [{"block": "0", "job_id": "12"}], "processes": []}
    write_run_meta(tmp_path, meta)
    assert cleanup_run(tmp_path) == ["nothing to cancel: none of the run's 1 SLURM job(s) is still queued or running"]


def test_no_module_outside_targets_tests_executor_names() -> None:
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "targets" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(s in line for s in ("executor ==", "executor !=", "executor in (", 'get("executor") ==')):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, found


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1-02:03:04", 93784.0), ("02:03:04", 7384.0), ("03:04", 184.0), ("59", 59.0), ("UNLIMITED", None), ("", None), ("x", None)],
)
def test_slurm_durations(text: str, seconds: float | None) -> None:
    from parsl_chat.backends.targets.slurm import parse_slurm_duration

    assert parse_slurm_duration(text) == seconds


def test_no_time_left_outside_a_slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    from parsl_chat.backends.targets.slurm import slurm_time_left_s

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_time_left_s() is None
