"""Where llama-server is found, how it is sized, and what the embedded server runs (no model needed)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import stat
from pathlib import Path

import pytest

from parsl_chat.config import ServerConfig, load_settings
from parsl_chat.core import llama_build as lb
from parsl_chat.errors import ServerError
from parsl_chat.serve.embedded import child_env
from parsl_chat.serve.server import server_command


def _fake_build(tmp_path: Path, **extra: str) -> Path:
    server = tmp_path / "bin" / "llama-server"
    server.parent.mkdir(parents=True)
    server.write_text("#!/bin/sh\n")
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "llama-server.json"
    data = {"server": str(server), "kind": "portable", "cmake_args": "-DGGML_NATIVE=OFF", "version": "0.3.36"}
    record.write_text(json.dumps({**data, **extra}))
    return record


def test_find_llama_build_reads_the_install_record(tmp_path: Path) -> None:
    record = _fake_build(tmp_path, system_info="CPU : AVX2 = 1 | ")
    build, why = lb.find_llama_build(record)
    assert why == "" and build is not None
    assert build.server == tmp_path / "bin" / "llama-server" and build.kind == "portable"
    assert build.system_info == "CPU : AVX2 = 1 | " and build.batched_bench is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "scripts/install has not built llama-server"),
        ("not json", "cannot read"),
        (json.dumps({"error": "llama-server did not compile (no cmake)"}), "could not build it: llama-server did not compile"),
        (json.dumps({"server": "/nonexistent/llama-server"}), "is missing (a cleared cache?)"),
    ],
)
def test_find_llama_build_says_why_there_is_none(tmp_path: Path, content: str | None, reason: str) -> None:
    record = tmp_path / "llama-server.json"
    if content is not None:
        record.write_text(content)
    build, why = lb.find_llama_build(record)
    assert build is None and reason in why


def test_job_cores_takes_the_least_of_slurm_cgroup_and_affinity() -> None:
    affinity = len(os.sched_getaffinity(0))
    assert lb.job_cores({}) <= affinity
    assert lb.job_cores({"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert lb.job_cores({"SLURM_CPUS_ON_NODE": str(affinity + 64)}) == lb.job_cores({})
    assert lb.job_cores({"SLURM_CPUS_ON_NODE": "garbage"}) == lb.job_cores({})


def test_cgroup_quota_in_whole_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores: rounds up
    monkeypatch.setattr(lb, "_cgroup_quota_files", lambda root: [(root / "cpu.max", None)])
    assert lb._cgroup_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert lb._cgroup_cores(tmp_path) is None
    (tmp_path / "quota").write_text("50000\n")
    (tmp_path / "period").write_text("100000\n")
    monkeypatch.setattr(lb, "_cgroup_quota_files", lambda root: [(root / "quota", root / "period")])  # cgroup v1
    assert lb._cgroup_cores(tmp_path) == 1


def test_slots_and_threads_follow_the_cores() -> None:
    assert lb.slot_count(1) == max(2, lb.SLOTS_PER_CORE)
    assert lb.slot_count(2) == 2 * lb.SLOTS_PER_CORE
    assert lb.slot_count(64) == lb.MAX_SLOTS
    assert lb.slot_count(2, configured=5) == 5
    assert lb.thread_counts(1) == (1, 1) and lb.thread_counts(2) == (1, 2) and lb.thread_counts(64) == (8, 8)
    build = lb.LlamaBuild(Path("llama-server"), None, "portable", "", "0.3.36", system_info="CPU : OPENMP = 1 | ")
    # llama-server's slots decode as one batch, on the prompt threads: every core, as OpenMP waits briefly
    assert build.openmp and lb.thread_counts(2, build) == (1, 2) and lb.thread_counts(4, build) == (3, 4)
    # ggml's own thread pool spins until every thread arrives: those threads leave the client's core
    spinning = dataclasses.replace(build, system_info="CPU : AVX2 = 1 | ")
    assert not spinning.openmp and lb.thread_counts(2, spinning) == (1, 1) and lb.thread_counts(4, spinning) == (3, 3)


def test_an_openmp_build_waits_briefly_unless_the_user_says_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path, system_info="CPU : AVX2 = 1 | OPENMP = 1 | "))
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = ServerConfig()
    plan = lb.embedded_plan(cfg, cores=2)
    assert (plan.threads, plan.batch_threads) == (1, 2)
    assert child_env(cfg, plan)["GOMP_SPINCOUNT"] == str(lb.OPENMP_SPIN_COUNT)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's own choice of waiting wins
    assert "GOMP_SPINCOUNT" not in child_env(cfg, plan) and child_env(cfg, plan)["OMP_WAIT_POLICY"] == "PASSIVE"
    llama_cpp_python = lb.embedded_plan(ServerConfig(engine="llama-cpp-python"), cores=2)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "GOMP_SPINCOUNT" not in child_env(cfg, llama_cpp_python) and not llama_cpp_python.environment


def test_llama_server_command_has_slots_batching_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path))
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    argv = server_command(ServerConfig(slots=3, context_tokens=1000), "127.0.0.1", 8080)
    assert argv[0] == str(tmp_path / "bin" / "llama-server")
    flags = {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}
    assert flags["--parallel"] == "3" and flags["--ctx-size"] == "3000"  # 1000 tokens per slot
    assert flags["--threads"] == "1" and flags["--port"] == "8080"
    assert "--cont-batching" in argv and "--metrics" in argv


def test_configured_threads_reach_the_llama_server_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path))
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2")
    sized = dict(itertools.pairwise(server_command(ServerConfig(), "127.0.0.1", 8080)))
    assert (sized["--threads"], sized["--threads-batch"]) == ("1", "1")  # from the cores
    chosen = dict(itertools.pairwise(server_command(ServerConfig(batch_threads=2), "127.0.0.1", 8080)))
    assert (chosen["--threads"], chosen["--threads-batch"]) == ("1", "2")
    plan = lb.embedded_plan(ServerConfig(threads=3, batch_threads=4), cores=2)
    assert (plan.threads, plan.batch_threads) == (3, 4) and "3 generation + 4 prompt threads" in plan.describe()


def test_engine_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb, "BUILD_RECORD", tmp_path / "missing.json")
    plan = lb.embedded_plan(ServerConfig())
    assert plan.build is None and plan.slots == 1 and "has not built llama-server" in plan.fallback
    assert "1 request at a time" in plan.describe()
    with pytest.raises(ServerError, match=r"server\.engine is llama-server, but scripts/install has not built"):
        lb.embedded_plan(ServerConfig(engine="llama-server"))
    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path))
    assert lb.embedded_plan(ServerConfig(engine="llama-cpp-python")).build is None
    plan = lb.embedded_plan(ServerConfig(slots=6), cores=2)
    assert plan.build is not None and plan.describe().startswith("llama-server (portable build): 6 slots")


def test_agents_default_to_a_share_of_the_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from parsl_chat.core.agents import resolve_agents

    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path))
    env = {"PARSL_CHAT_SERVER_SLOTS": "8"}
    agents = resolve_agents(load_settings("local", env=env), "node-local://model-server/v1", "m", None)
    assert [a.concurrency for a in agents] == [3, 3, 3]  # ceil(8 / 3): no slot starves
    assert not any(a.concurrency_given for a in agents)  # ours: Parsl's workers may round it without a note
    given = resolve_agents(load_settings("local", env={**env, "PARSL_CHAT_LIMITS_CONCURRENCY": "2"}), "x", "m", None)
    assert [a.concurrency for a in given] == [2, 2, 2] and all(a.concurrency_given for a in given)
    elsewhere = resolve_agents(load_settings("local", env={**env, "OPENAI_BASE_URL": "http://h:1/v1"}), "x", "m", None)
    assert [a.concurrency for a in elsewhere] == [4, 4, 4]  # not the embedded server: limits.concurrency's default


def test_the_share_counts_every_node_server_of_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from parsl_chat.backends.targets import model_servers
    from parsl_chat.core.agents import resolve_agents

    monkeypatch.setattr(lb, "BUILD_RECORD", _fake_build(tmp_path))
    local = load_settings("local", env={"PARSL_CHAT_SERVER_SLOTS": "8"})
    assert model_servers(local.profile) == (1, None)  # the driver's own server, sized from this machine
    slurm = load_settings("slurm", env={"PARSL_CHAT_SERVER_SLOTS": "8", "PARSL_CHAT_CORES_PER_NODE": "4"})
    nodes, cores = model_servers(slurm.profile)
    assert cores == 4 and nodes >= 1
    two = resolve_agents(local, "node-local://model-server/v1", "m", None, (2, None))
    assert [a.concurrency for a in two] == [6, 6, 6]  # ceil(2 servers x 8 slots / 3 agents)
