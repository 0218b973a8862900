"""Shared fixtures: the simulated endpoint, the embedded model server, a CLI runner.

Under CI=true a skipped test is turned into a failure: the SLURM, model and
Kubernetes tests must really run there.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["fixtures.slurm"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def _no_skips_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    _no_skips_in_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    # a module-level importorskip (the Kubernetes tests' kmock) skips the whole file at collection
    outcome = yield
    _no_skips_in_ci(outcome.get_result())  # type: ignore[attr-defined]


@pytest.fixture
def sim_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``sim_server(latency_ms=50, rate_500=0.1, ...)`` -> a started SimulatedServer."""
    from parsl_chat.serve.simulated import FaultPlan, SimulatedServer

    started: list[SimulatedServer] = []

    def start(log_path: str | None = None, **plan: Any) -> SimulatedServer:
        # generous start-up bound: CI's two cores may be busy with a Parsl or SLURM test
        server = SimulatedServer(plan=FaultPlan(**plan), log_path=log_path, startup_timeout_s=60)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real embedded model (SmolLM2-135M on llama.cpp), started once per session."""
    from parsl_chat.config import ServerConfig
    from parsl_chat.serve.server import ModelServer

    log = tmp_path_factory.mktemp("model") / "server.log"
    server = ModelServer(ServerConfig(), log_path=log)
    try:
        url = server.start()
    except Exception as exc:  # reported as a skip, which CI turns into a failure
        pytest.skip(f"embedded model server unavailable: {exc}")
    yield url
    server.stop()


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the user's parsl-chat/OpenAI settings (they would change what a test runs), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARSL_CHAT_", "OPENAI_"))}
    env.update(extra or {})
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``parsl-chat`` as users do: a separate process, real exit code."""
    return subprocess.run(
        [sys.executable, "-m", "parsl_chat", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        input=input,
        timeout=timeout,
        cwd=cwd or REPO,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


def write_prompts(path: Path, n: int) -> Path:
    """``n`` prompts ``p0``.. with texts ``question 0``..: the simulator's request log names them by text."""
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}"}) + "\n" for i in range(n)))
    return path


def start_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``parsl-chat ARGS`` in the background, in a session of its own (a signal reaches the driver only)."""
    return subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", *args],
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_rows(out: Path, at_least: int, timeout: float = 60) -> None:
    """Until the run's ledger holds ``at_least`` rows."""
    from parsl_chat.io.ledger import read_ledger

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "ledger.jsonl").exists() and sum(1 for _ in read_ledger(out / "ledger.jsonl")) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} rows recorded after {timeout} s")


def assert_figures_within_bounds(summary: dict[str, Any]) -> None:
    """Every share, utilisation and efficiency in a summary is within 0-100 %, every time span >= 0.

    Called on the summaries of real runs, one per profile the suite runs: a figure
    outside its bounds is a wrong definition (the warm start's 167.8 % worker).
    """
    shares: list[tuple[str, Any]] = [("parallel_efficiency", summary.get("parallel_efficiency"))]
    shares += [(f"agent {a['agent']} utilisation", a.get("utilisation")) for a in summary.get("agents") or []]
    shares += [(f"worker {w['worker']} utilisation", w.get("utilisation")) for w in summary.get("workers") or []]
    for node in summary.get("nodes") or []:
        shares += [(f"node {node['node']} {key}", node.get(key)) for key in ("share_prompts", "share_busy", "active_fraction")]
    allocation = summary.get("allocation") or {}
    shares.append(("allocation busy_fraction", allocation.get("busy_fraction")))
    for name, value in shares:
        assert value is None or 0.0 <= value <= 1.0 + 1e-9, f"{name} = {value}"
    spans = [("wall_s", summary.get("wall_s"))]
    for block in allocation.get("blocks") or []:
        spans += [(f"block {block['block']} {key}", block.get(key)) for key in ("queue_wait_s", "duration_s")]
    spans += [(f"node {n['node']} idle_s", n.get("idle_s")) for n in allocation.get("per_node") or []]
    for name, value in spans:
        assert value is None or value >= 0.0, f"{name} = {value}"


# --------------------------------------------------------------------------- llama.cpp builds

#: the CPU features scripts/install's portable builds may use
PORTABLE = {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "NEON"}


def installed_kind() -> str:
    """How the installed llama-cpp-python was built, from the wheel scripts/install installed it from."""
    try:
        direct = importlib.metadata.distribution("llama-cpp-python").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return "missing"
    url = json.loads(direct or "{}").get("url", "")
    match = re.search(r"/parsl-chat/wheels/llama-cpp-python-[^/]*-(portable|native|custom)(?:-[0-9a-f]+)?/", url)
    return match.group(1) if match else "unknown (not from scripts/install)"
