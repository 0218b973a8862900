"""The Backend contract: one suite run over every backend, as Parsl runs one suite over several configs.

Each test builds ChunkTasks as the run does and talks to the backend only through the
:class:`~parsl_chat.backends.Backend` Protocol. SLURM and Kubernetes run the Parsl backend
too; their own suites (test_slurm.py, test_k8s_emulator.py) cover them under their markers.
"""

from __future__ import annotations

import ast
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from parsl_chat.backends import Backend
from parsl_chat.backends.inprocess import InProcessBackend
from parsl_chat.backends.parsl import POLL_PERIOD_MS, ParslBackend
from parsl_chat.backends.warmstart import WarmStartBackend
from parsl_chat.config import LimitsConfig, load_settings
from parsl_chat.core.agents import UNFINISHED, AgentSpec
from parsl_chat.worker.executor import ChunkTask, WorkItem, unfinished_rows

BACKENDS = ("inprocess", "parsl-local", "warmstart")
PACKAGE = Path(__file__).resolve().parents[2] / "parsl_chat"


def _parsl_local(tmp_path: Path, workers: int) -> ParslBackend:
    settings = load_settings("local", None, {"endpoint": "http://127.0.0.1:9/v1"})
    profile = replace(settings.profile, workers=workers)
    return ParslBackend(profile, f"test-{uuid.uuid4().hex[:8]}", tmp_path / "parsl")


def _build(kind: str, tmp_path: Path) -> Backend:
    if kind == "inprocess":
        return InProcessBackend(2)
    if kind == "parsl-local":
        return _parsl_local(tmp_path, 2)
    return WarmStartBackend(_parsl_local(tmp_path, 2), 2, tmp_path / ".warm-start-drain")


def _stop_files(backend: Backend, stop_file: Path) -> list[Path]:
    """What the run touches to stop: the chunks' stop file, and a warm start's drain file (``_Stop.also_touch``)."""
    return [stop_file, backend.drain_file] if isinstance(backend, WarmStartBackend) else [stop_file]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A started backend of each kind, shut down after the test."""
    built = _build(request.param, tmp_path)
    built.start()
    try:
        yield built
    finally:
        built.shutdown()


def _task(server_url: str, count: int, stop_file: Path, *, concurrency: int = 2) -> ChunkTask:
    agents = [AgentSpec(name="a", system_prompt="", model="sim", endpoint=server_url, concurrency=concurrency)]
    items = [
        WorkItem(
            prompts=[
                {"custom_id": f"q{i}", "line": i + 1, "messages": [{"role": "user", "content": f"question {i}"}], "digest": "d"}
            ],
            agent=0,
        )
        for i in range(count)
    ]
    return ChunkTask(
        run_id=f"test-{uuid.uuid4().hex[:8]}",  # the worker keeps each agent's limits per run
        chunk_id=0,
        agents=agents,
        slots=[concurrency],
        limits=LimitsConfig(),
        items=items,
        stop_file=str(stop_file),
    )


def _rows(backend: Backend, task: ChunkTask, timeout: float = 120) -> list[dict[str, Any]]:
    now = time.time()
    for item in task.items:
        item.submitted_at = now
    rows: list[dict[str, Any]] = backend.submit(task).result(timeout=timeout)
    return rows


def test_every_row_comes_back_exactly_once(backend: Backend, sim_server: Callable[..., Any], tmp_path: Path) -> None:
    server = sim_server(latency_ms=20)
    rows = _rows(backend, _task(server.url, 12, tmp_path / ".stop"))
    assert sorted(row["custom_id"] for row in rows) == sorted(f"q{i}" for i in range(12))
    assert all(row["status"] == "ok" for row in rows)
    assert sorted(r["prompt"] for r in server.requests()) == sorted(f"question {i}" for i in range(12))
    backend.note_rows(rows)
    backend.all_submitted()
    blocks = backend.blocks()
    assert blocks and all({"block", "job_id", "submitted_at", "ended_at", "nodes"} <= set(b) for b in blocks)
    assert all({"role", "pid", "started"} <= set(p) for p in backend.processes())


def test_a_stop_file_sends_nothing_new(backend: Backend, sim_server: Callable[..., Any], tmp_path: Path) -> None:
    server = sim_server(latency_ms=20)
    stop_file = tmp_path / ".stop"
    for path in _stop_files(backend, stop_file):
        path.touch()
    rows = _rows(backend, _task(server.url, 6, stop_file))
    final, _ = unfinished_rows(rows)
    assert final == [] and all(row["status"] == UNFINISHED for row in rows)  # none run: the resume sends them
    assert server.requests() == []


def test_a_stop_mid_chunk_lets_requests_in_flight_finish_and_starts_no_more(
    backend: Backend, sim_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = sim_server(latency_ms=300)
    stop_file = tmp_path / ".stop"
    task = _task(server.url, 8, stop_file, concurrency=1)
    now = time.time()
    for item in task.items:
        item.submitted_at = now
    future = backend.submit(task)
    deadline = time.monotonic() + 120
    while not server.requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    for path in _stop_files(backend, stop_file):
        path.touch()
    rows = future.result(timeout=120)
    final, _ = unfinished_rows(rows)
    ids = [row["custom_id"] for row in final]
    assert 0 < len(final) < 8 and len(ids) == len(set(ids))
    assert all(row["status"] == "ok" for row in final)  # a request in flight is not cut short
    assert len(server.requests()) == len(final)  # every request sent came back, once


@pytest.mark.parametrize("kind", BACKENDS)
def test_shutdown_is_idempotent_and_ends_every_block(kind: str, sim_server: Callable[..., Any], tmp_path: Path) -> None:
    backend = _build(kind, tmp_path)
    backend.start()
    server = sim_server(latency_ms=5)
    assert len(_rows(backend, _task(server.url, 2, tmp_path / ".stop"))) == 2
    backend.shutdown()
    backend.shutdown()
    assert all(b["ended_at"] is not None for b in backend.blocks())


def _wakeups(pid: int) -> int:
    """Context switches so far of every thread of ``pid``: each is one wakeup (or one preemption)."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def test_an_idle_interchange_wakes_about_ten_times_a_second(tmp_path: Path) -> None:
    """Parsl's default poll period woke it 100 times a second, each a chance to preempt the model server's threads."""
    backend = _parsl_local(tmp_path, 1)
    backend.start()
    try:
        pid = next(p["pid"] for p in backend.processes() if p["role"] == "interchange")
        time.sleep(1.0)  # past its start-up
        before = _wakeups(pid)
        time.sleep(2.0)
        woke = _wakeups(pid) - before
    finally:
        backend.shutdown()
    # Parsl's default of 10 ms: about 200; POLL_PERIOD_MS (100): about 20
    assert woke < 2 * 4 * 1000 / POLL_PERIOD_MS < 200, f"{woke} wakeups in 2 s"


def test_backends_import_no_higher_layer() -> None:
    """Backends build on the core modules; the run, the CLI, the chat and the report build on them."""
    higher = {"run", "cli", "chat", "report", "analysis"}
    for path in sorted((PACKAGE / "backends").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [node.module or ""] if node.module else [a.name for a in node.names]
                top = {n.split(".")[0] for n in names}
                assert not top & higher, f"{path.name} imports {node.module!r}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    assert not (parts[0] == "parsl_chat" and len(parts) > 1 and parts[1] in higher), path.name
