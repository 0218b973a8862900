"""Shared fixtures: the simulated endpoint, the embedded model server, a CLI runner.

Under CI=true a skipped test is turned into a failure: the SLURM, model and
Kubernetes tests must really run there.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    from parsl_chat.testing import FaultPlan, SimulatedServer

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
    from parsl_chat.server import ModelServer

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
