"""Build run directories for tests, exactly as the pipeline writes them.

``results.parquet`` is written with pyarrow and the schema of docs/interfaces.md (column
order and types), ``results.csv`` with the same rows, ``run.json`` with the
run metadata; optionally ``ledger.jsonl`` (timestamps as ISO strings) and
``config.yaml``. Times are given in seconds after :data:`T0`.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from parsl_chat.io.results import SCHEMA

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)

# the writer's own schema: the analysis must read exactly what runs write
TS = pa.timestamp("us", tz="UTC")
COLUMNS = SCHEMA.names


def at(seconds: float | None) -> datetime | None:
    """``T0 + seconds`` (``None`` stays ``None``)."""
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def iso(seconds: float | None) -> str | None:
    stamp = at(seconds)
    return None if stamp is None else stamp.isoformat().replace("+00:00", "Z")


def row(
    custom_id: str,
    *,
    agent: str = "a",
    node: str | None = "n1",
    worker: str | None = "w0",
    block: str | None = "0",
    job_id: str | None = None,
    submit: float = 0.0,
    start: float | None = 0.0,
    latency: float | None = 1.0,
    status: str = "ok",
    error_type: str | None = None,
    attempts: int = 1,
    prompt_tokens: int | None = 10,
    completion_tokens: int | None = 20,
    line: int | None = None,
) -> dict[str, Any]:
    """One result row; ``finished_at = start + latency``; failed rows carry no tokens."""
    failed = status != "ok"
    finish = None if start is None or latency is None else start + latency
    return {
        "custom_id": custom_id,
        "line": line if line is not None else int("".join(c for c in custom_id if c.isdigit()) or 0),
        "agent": agent,
        "model": f"model-{agent}",
        "endpoint": "http://127.0.0.1:8000/v1",
        "hostname": None if node is None else f"{node}.cluster",
        "node": node,
        "worker": worker,
        "block": block,
        "job_id": job_id,
        "conversation": None,
        "turn": None,
        "status": status,
        "error_type": error_type if failed else None,
        "error": f"{error_type}: something went wrong" if failed else None,
        "attempts": attempts,
        "submitted_at": at(submit),
        "started_at": at(start),
        "finished_at": at(finish),
        "queue_s": None if start is None else start - submit,
        "latency_s": None if start is None else latency,
        "prompt_tokens": None if failed else prompt_tokens,
        "completion_tokens": None if failed else completion_tokens,
        "finish_reason": None if failed else "stop",
        "response": None if failed else f"answer {custom_id}",
    }


def run_meta(
    run_id: str = "run-1",
    *,
    start: float | None = 0.0,
    finish: float | None = 10.0,
    status: str = "complete",
    agents: list[dict[str, Any]] | None = None,
    blocks: list[dict[str, Any]] | None = None,
    workers: int = 4,
    cost: dict[str, Any] | None = None,
    executor: str = "local",
) -> dict[str, Any]:
    """A run.json dict; ``agent_slots`` is the sum of the agents' concurrency."""
    agents = (
        agents
        if agents is not None
        else [
            {"name": "a", "model": "model-a", "endpoint": "http://127.0.0.1:8000/v1", "concurrency": 2, "weight": 1},
            {"name": "b", "model": "model-b", "endpoint": "http://127.0.0.1:8000/v1", "concurrency": 2, "weight": 1},
        ]
    )
    return {
        "run_id": run_id,
        "version": "0.1.0",
        "command": ["parsl-chat", "run", "prompts.jsonl"],
        "prompts_file": "prompts.jsonl",
        "started_at": iso(start),
        "finished_at": iso(finish),
        "status": status,
        "executor": executor,
        "workers": workers,
        "agent_slots": sum(int(a["concurrency"]) for a in agents),
        "agents": agents,
        "routing": "round_robin",
        "blocks": blocks if blocks is not None else [],
        "cost": cost,
    }


def _ledger_value(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def make_run(
    directory: Path,
    rows: list[dict[str, Any]],
    run: dict[str, Any] | None = None,
    *,
    results: bool = True,
    ledger: bool = False,
    ledger_rows: list[dict[str, Any]] | None = None,
    torn: bool = False,
    config_yaml: str | None = "executor: local\nagents: 2\n",
) -> Path:
    """Write a run directory and return it.

    ``results`` writes results.parquet/.csv; ``ledger`` writes ledger.jsonl
    (``ledger_rows`` if given, else ``rows``), and ``torn`` appends half a
    record as a crash would leave it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if run is not None:
        (directory / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    if results:
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)
        pq.write_table(table, directory / "results.parquet")
        with (directory / "results.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({c: _ledger_value(r.get(c)) for c in COLUMNS})
    if ledger:
        with (directory / "ledger.jsonl").open("w", encoding="utf-8") as fh:
            for r in ledger_rows if ledger_rows is not None else rows:
                fh.write(json.dumps({c: _ledger_value(r.get(c)) for c in COLUMNS}) + "\n")
            if torn:
                fh.write('{"custom_id": "torn", "status": "o')
    if config_yaml is not None:
        (directory / "config.yaml").write_text(config_yaml, encoding="utf-8")
    (directory / "logs").mkdir(exist_ok=True)
    return directory


def synthetic_run(
    directory: Path,
    *,
    prompts: int = 300,
    nodes: int = 2,
    workers_per_node: int = 4,
    agents: tuple[str, ...] = ("analyst", "coder", "critic"),
    seed: int = 0,
    error_rate: float = 0.05,
    status: str = "complete",
    cost: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """A plausible SLURM run: workers pull prompts as they free up, lognormal latencies, a few failures."""
    import random

    rng = random.Random(seed)
    workers = [(f"nid{n:03d}", f"w{w}") for n in range(1, nodes + 1) for w in range(workers_per_node)]
    free_at = {key: rng.uniform(0.5, 2.0) for key in workers}  # worker start-up
    kinds = ("rate_limit", "timeout", "server_error", "context_length")
    rows = []
    for i in range(prompts):
        key = min(free_at, key=lambda k: free_at[k])
        start = free_at[key]
        latency = rng.lognormvariate(0.3, 0.5)
        failed = rng.random() < error_rate
        agent = agents[i % len(agents)]
        rows.append(
            row(
                f"p{i}",
                line=i + 1,
                agent=agent,
                node=key[0],
                worker=key[1],
                block=str((int(key[0][3:]) - 1) // 2),
                job_id=str(4242 + (int(key[0][3:]) - 1) // 2),
                submit=0.2,
                start=start,
                latency=latency,
                status="error" if failed else "ok",
                error_type=rng.choice(kinds) if failed else None,
                attempts=rng.choice((1, 1, 1, 2, 3)) if failed else 1,
                prompt_tokens=rng.randint(20, 200),
                completion_tokens=rng.randint(30, 400),
            )
        )
        free_at[key] = start + latency + rng.uniform(0.0, 0.05)
    end = max(r["finished_at"] for r in rows if r["finished_at"]) - T0
    finish = end.total_seconds() + 0.5
    block_ids = sorted({r["block"] for r in rows})
    blocks = [
        {
            "block": b,
            "job_id": str(4242 + int(b)),
            "submitted_at": iso(-30.0 - 5 * int(b)),
            "ended_at": iso(finish),
            "nodes": sorted({r["node"] for r in rows if r["block"] == b}),
            "cores_per_node": 32,
        }
        for b in block_ids
    ]
    agent_meta = [
        {
            "name": a,
            "model": "qwen2.5-0.5b-instruct",
            "endpoint": "http://127.0.0.1:8000/v1",
            "concurrency": -(-len(workers) // len(agents)),
            "weight": 1,
        }
        for a in agents
    ]
    meta = run_meta(
        run_id or f"synthetic-{nodes}n",
        finish=None if status in ("running", "interrupted") else finish,
        status=status,
        agents=agent_meta,
        blocks=blocks,
        workers=len(workers),
        cost=cost,
        executor="slurm",
    )
    return make_run(
        directory, rows, meta, config_yaml="executor: slurm\npartition: gpu\napi_key: sk-abcdefghijklmnop\nnodes_per_block: 2\n"
    )
