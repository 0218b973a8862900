"""/batch: N requests in parallel across the agents, on Parsl (or in-process with --no-parsl)."""

from __future__ import annotations

import time
from concurrent.futures import Future, as_completed
from typing import TYPE_CHECKING

from ..backends import Backend
from ..backends.inprocess import InProcessBackend
from ..core.agents import AgentSpec
from ..core.routing import Router
from ..io.prompts import Prompt
from ..io.rows import LedgerRow
from ..worker.executor import ChunkTask, WorkItem, lost_rows
from .stats import fmt_pct, fmt_s, percentiles, row_stat, summarize_requests

if TYPE_CHECKING:
    from .session import ChatSession

__all__ = ["MAX_BATCH", "SAMPLE_PROMPTS", "cmd_batch"]

#: used by ``/batch N`` without a prompt
SAMPLE_PROMPTS = (
    "Explain Amdahl's law in one sentence.",
    "What is a SLURM partition?",
    "Name one advantage of batching requests to a language model.",
    "What does parallel efficiency measure?",
    "Give a one-line definition of latency.",
)
MAX_BATCH = 100_000


def cmd_batch(session: ChatSession, arg: str) -> None:
    count_text, _, prompt = arg.partition(" ")
    if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_BATCH:
        session.problem(f"usage: /batch N [prompt]  (N from 1 to {MAX_BATCH})")
        return
    count, prompt = int(count_text), prompt.strip()
    backend = _batch_backend(session)
    session.batches += 1
    texts = [prompt] * count if prompt else [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(count)]
    rows, wall = _run_batch(session, backend, texts)
    for row in rows:
        session.requests.append(row_stat(row))
    stats = [row_stat(r) for r in rows]
    s = summarize_requests(stats, session.agents, wall)
    queue_p50, _ = percentiles([queue_s for r in rows if (queue_s := r.get("queue_s")) is not None])
    spread = ", ".join(f"{name} {a['requests']}" for name, a in s["agents"].items() if a["requests"])
    session.say(
        f"batch {session.batches}: {len(rows)} of {count} requests via {_backend_label(session)}: "
        f"{s['ok']} ok, {s['errors']} failed in {wall:.2f} s ({spread})"
    )
    session.say(
        f"  throughput {s['requests_per_s']:.2f} req/s, {s['completion_tokens'] / max(wall, 1e-9):.1f} tokens/s; "
        f"latency p50 {fmt_s(s['latency_p50_s'])}, p95 {fmt_s(s['latency_p95_s'])}; queue p50 {fmt_s(queue_p50)}; "
        f"parallel efficiency {fmt_pct(s['parallel_efficiency'])} ({s['agent_slots']} agent slots)"
    )
    failed = [r for r in rows if r["status"] != "ok"]
    for row in failed[:3]:
        session.error(row.get("agent") or "?", row.get("error_type") or "other", row.get("error") or "")
    if len(failed) > 3:
        session.problem(f"... and {len(failed) - 3} more failed")


def _backend_label(session: ChatSession) -> str:
    if session.cfg.no_parsl:
        return f"in-process backend ({session.settings.profile.workers} workers)"
    workers = session.batch_backend.workers if session.batch_backend else "?"
    return f"Parsl ({session.settings.profile.executor}, {workers} workers)"


def _batch_backend(session: ChatSession) -> Backend:
    if session.batch_backend is None:
        if session.cfg.no_parsl:
            backend: Backend = InProcessBackend(session.settings.profile.workers)
        else:
            from ..backends.parsl import ParslBackend

            session.note(f"starting Parsl ({session.settings.profile.executor} profile) for /batch ...")
            backend = ParslBackend(session.settings.profile, session.run_id, session.cfg.runtime_dir / "parsl")
        backend.start()
        session.batch_backend = backend
    return session.batch_backend


def _batch_agents(session: ChatSession) -> list[AgentSpec]:
    if session.cfg.batch_agents is None or session.cfg.no_parsl:
        return session.agents
    return session.cfg.batch_agents


def _run_batch(session: ChatSession, backend: Backend, texts: list[str]) -> tuple[list[LedgerRow], float]:
    from ..progress import RunProgress
    from ..run import chunk_size, slots_per_worker

    agents = _batch_agents(session)
    router = Router(agents, session.settings.run.routing)
    items = []
    for i, text in enumerate(texts, 1):
        prompt = Prompt(custom_id=f"batch{session.batches}-{i}", line=i, messages=({"role": "user", "content": text},))
        record = prompt.to_dict()
        record["digest"] = prompt.digest
        items.append(WorkItem(prompts=[record], agent=router.assign(None)))
    slots = slots_per_worker(agents, backend.workers, session.cfg.no_parsl)
    size = chunk_size(slots, backend.workers, len(items), session.settings.run.limits.chunk_size)
    stop_file = session.cfg.runtime_dir / ".stop"
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.unlink(missing_ok=True)
    started = time.time()
    for item in items:
        item.submitted_at = started
    futures: dict[Future[list[LedgerRow]], ChunkTask] = {}
    for cid, start in enumerate(range(0, len(items), size)):
        task = ChunkTask(
            run_id=session.run_id,
            chunk_id=cid,
            agents=agents,
            slots=slots,
            limits=session.settings.run.limits,
            items=items[start : start + size],
            stop_file=str(stop_file),
            node_server=session.cfg.node_server if not session.cfg.no_parsl else None,
            extra={"node_endpoint_placeholder": session.cfg.node_placeholder},
        )
        futures[backend.submit(task)] = task
    rows: list[LedgerRow] = []
    try:
        with RunProgress(len(items), console=session.err_console, quiet=not session.interactive) as progress:
            for future in as_completed(futures):
                try:
                    got = future.result()
                except Exception as exc:  # a worker died: its chunk's requests failed
                    got = lost_rows(futures[future], f"worker lost: {type(exc).__name__}: {exc}")
                rows += got
                failed = sum(1 for r in got if r["status"] != "ok")
                progress.add(len(got) - failed, failed)
    except KeyboardInterrupt:
        stop_file.touch()
        for future in futures:
            future.cancel()
        session.problem(f"batch interrupted: {len(rows)} of {len(items)} requests finished")
    return rows, time.time() - started
