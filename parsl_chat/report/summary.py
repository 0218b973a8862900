"""The run-level metrics of ``summary.json``: :func:`summarize` and the sections it is made of.

The pipeline writes ``summary.json`` with :func:`write_summary`, and ``parsl-chat report``
recomputes the same numbers with the same function, so the two never disagree.

Definitions (every duration in seconds, every timestamp UTC):

wall clock
    ``run.json`` ``started_at`` -> ``finished_at`` when both are present (the
    driver's own wall clock: it includes start-up, block queueing and draining).
    A run without ``finished_at`` (still running, crashed) ends at the last
    ``finished_at`` of a row; a run without ``run.json`` times spans the first
    ``submitted_at`` to the last ``finished_at`` of the rows.
busy seconds
    Sum of ``latency_s`` over the rows that have one (successful *and* failed
    requests: a failing request holds its agent slot as long as it runs).
percentiles
    Linear interpolation between closest ranks (numpy's default method).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from .._files import atomic_write
from .allocation import allocation_summary
from .compact import read_compact
from .cost import cost_summary
from .groups import agent_table, node_table, worker_table
from .load import SUMMARY_COLUMNS, is_normal, load_run, normalize, read_run_json
from .outcomes import error_table, slowest_prompts, structured_table
from .rows import agent_slots, cache_hits, label_codes, new_tokens, ok_mask, run_meta
from .values import as_number, iso_text, parse_time, percentiles_of, safe_ratio

__all__ = ["PARTIAL_STATUSES", "SUMMARY_SCHEMA", "Summary", "summarize", "summarize_run", "wall_clock", "write_summary"]


class Summary(TypedDict):
    """What :func:`summarize` returns and ``summary.json`` holds, in this order (docs/interfaces.md).

    Each section is a plain JSON-ready dict (or list of them), documented by the function that makes it.
    """

    schema: int
    run: dict[str, Any]
    counts: dict[str, Any]
    wall: dict[str, Any]
    wall_s: float | None
    throughput: dict[str, Any]
    tokens: dict[str, Any]
    latency_s: dict[str, Any] | None
    queue_s: dict[str, Any] | None
    busy_agent_s: float
    agent_slots: int | None
    parallel_efficiency: float | None
    server_time: dict[str, Any] | None
    agents: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    allocation: dict[str, Any] | None
    cost: dict[str, Any] | None
    cache: dict[str, Any] | None
    errors: list[dict[str, Any]]
    slowest: list[dict[str, Any]]
    structured: list[dict[str, Any]] | None


#: Run statuses whose results may be incomplete ("failed" is a finished run with too many failed prompts).
PARTIAL_STATUSES = ("running", "interrupted")
#: the version of summary.json's layout (its ``schema`` key)
SUMMARY_SCHEMA = 1


def wall_clock(df: pd.DataFrame) -> dict[str, Any]:
    """The wall clock of the run: ``{"start", "end", "wall_s", "basis"}``.

    Start is ``run.json`` ``started_at``, else the first ``submitted_at``
    (else first ``started_at``). End is ``run.json`` ``finished_at``, else the
    last ``finished_at`` of a row. ``wall_s`` is ``None`` when either end is
    unknown or the span is not positive.
    """
    run = run_meta(df)
    start, end = parse_time(run.get("started_at")), parse_time(run.get("finished_at"))
    basis_start, basis_end = "run.json started_at", "run.json finished_at"
    if start is None:
        first = df["submitted_at"].min() if df["submitted_at"].notna().any() else df["started_at"].min()
        start = None if pd.isna(first) else pd.Timestamp(first)
        basis_start = "first submitted_at"
    if end is None:
        last = df["finished_at"].max()
        end = None if pd.isna(last) else pd.Timestamp(last)
        basis_end = "last finished_at"
    wall = (end - start).total_seconds() if start is not None and end is not None else None
    return {
        "start": iso_text(start),
        "end": iso_text(end),
        "wall_s": wall if wall is not None and wall > 0 else None,
        "basis": f"{basis_start} -> {basis_end}",
    }


def summarize(df: pd.DataFrame) -> Summary:
    """All run-level metrics of ``df`` (from :func:`load_run`), JSON-serialisable (see :class:`Summary`).

    Sections (each documented by the function that computes it):
    ``run`` (metadata, ``partial`` flag, notes), ``counts`` (:func:`_counts`),
    ``wall`` (:func:`wall_clock`), ``wall_s``, ``throughput``, ``tokens``
    (:func:`_throughput`), ``latency_s`` and ``queue_s`` (:func:`_latency`,
    :func:`_queue`), ``busy_agent_s``, ``agent_slots``, ``parallel_efficiency``
    (:func:`_efficiency`), ``server_time`` (:func:`_server_time`, ``None``
    without server timings), ``agents``, ``nodes``, ``workers`` (per-group
    tables), ``allocation`` (:func:`allocation_summary`, ``None`` without scheduler
    blocks), ``cost`` (:func:`cost_summary`, ``None`` without prices), ``errors``,
    ``slowest`` and ``structured`` (:func:`structured_table`, ``None`` without schemas).
    """
    if not is_normal(df, SUMMARY_COLUMNS):
        df = normalize(df)
    run = run_meta(df)
    wall = wall_clock(df)
    wall_s = wall["wall_s"]
    counts = {**_counts(df), "unfinished": int(run.get("unfinished") or 0)}
    tokens, throughput = _throughput(df, counts, wall_s)
    allocation = allocation_summary(df, wall)
    efficiency = _efficiency(df, run, wall_s)
    return {
        "schema": SUMMARY_SCHEMA,
        "run": _run_section(df, run, counts),
        "counts": counts,
        "wall": wall,
        "wall_s": wall_s,
        "throughput": throughput,
        "tokens": tokens,
        "latency_s": _latency(df),
        "queue_s": _queue(df),
        "busy_agent_s": efficiency["busy_agent_s"],
        "agent_slots": efficiency["agent_slots"],
        "parallel_efficiency": efficiency["parallel_efficiency"],
        "server_time": _server_time(df, run, wall_s),
        "agents": agent_table(df, run, wall_s),
        "nodes": node_table(df, wall_s),
        "workers": worker_table(df, run, wall_s),
        "allocation": allocation,
        "cost": cost_summary(df, run, wall_s, allocation, tokens),
        "cache": _cache(df, run),
        "errors": error_table(df),
        "slowest": slowest_prompts(df),
        "structured": structured_table(df),
    }


def summarize_run(path: str | Path) -> Summary:
    """``summarize(load_run(path))``, with memory to spare for a million rows.

    ``results.parquet`` is read column by column into a compact frame (see
    :func:`read_compact`). The numbers are the same as from :func:`load_run`
    (tests compare both).
    """
    run_dir = Path(path)
    parquet = run_dir / "results.parquet"
    try:
        df = read_compact(parquet) if parquet.exists() else None
    except Exception:  # pyarrow raises many types for a damaged file: load_run says what it can
        df = None
    if df is None:
        return summarize(load_run(run_dir, columns=SUMMARY_COLUMNS))
    notes: list[str] = []
    df.attrs.update(run=read_run_json(run_dir, notes), run_dir=str(run_dir), source="results.parquet", notes=notes)
    return summarize(df)


def write_summary(path: str | Path) -> Path:
    """Write ``<run_dir>/summary.json`` from the run directory's own files and return its path.

    The pipeline calls this after writing ``run.json`` and the results, so
    ``summary.json`` holds exactly what ``parsl-chat report --json`` prints.
    """
    run_dir = Path(path)
    target = run_dir / "summary.json"
    atomic_write(target, json.dumps(summarize_run(run_dir), indent=2) + "\n")
    return target


def _run_section(df: pd.DataFrame, run: Mapping[str, Any], counts: Mapping[str, Any]) -> dict[str, Any]:
    """Run metadata; ``partial`` is true when the status is running/interrupted or rows came from the ledger."""
    status = run.get("status")
    source = df.attrs.get("source", "results.parquet")
    notes = list(df.attrs.get("notes", []))
    partial = status in PARTIAL_STATUSES or source == "ledger.jsonl"
    if status in ("running", "interrupted"):
        notes.append(f"run status is {status!r}: the numbers cover the {counts['prompts']} prompt(s) recorded so far")
    if counts.get("unfinished"):
        notes.append(
            f"{counts['unfinished']} prompt(s) unfinished at the stop ({run.get('stop_reason') or 'stopped'}): "
            "not failed, 'parsl-chat run --resume' sends them"
        )
    elif status == "failed":
        notes.append(
            f"run status is 'failed': {counts['error']} of {counts['prompts']} prompts failed, "
            "more than --max-failures allows; every prompt is recorded"
        )
    return {
        "run_id": run.get("run_id") or (Path(str(df.attrs["run_dir"])).name if df.attrs.get("run_dir") else None),
        "run_dir": df.attrs.get("run_dir"),
        "status": status,
        "version": run.get("version"),
        "executor": run.get("executor"),
        "routing": run.get("routing"),
        "prompts_file": run.get("prompts_file"),
        "command": run.get("command"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "workers": run.get("workers"),
        "agent_slots": run.get("agent_slots"),
        "source": source,
        "partial": bool(partial),
        "notes": notes,
    }


def _counts(df: pd.DataFrame) -> dict[str, Any]:
    """``prompts`` rows; ``ok``/``error`` by status; ``errors_by_type`` error rows per
    ``error_type`` (missing type counted as ``other``); ``retried`` rows with
    ``attempts > 1``; ``not_started`` rows without ``started_at``."""
    ok = ok_mask(df)
    errors = label_codes(df.loc[~ok, "error_type"], "other")
    by_type = {str(k): int(v) for k, v in sorted(errors.value_counts().items(), key=lambda kv: str(kv[0])) if v}
    return {
        "prompts": len(df),
        "ok": int(ok.sum()),
        "error": int((~ok).sum()),
        "errors_by_type": by_type,
        "retried": int((df["attempts"].fillna(0) > 1).sum()),
        "not_started": int(df["started_at"].isna().sum()),
    }


def _throughput(df: pd.DataFrame, counts: Mapping[str, Any], wall_s: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokens (sums over rows that report them; cache hits count none: no endpoint processed
    them, see :func:`_cache`) and rates over the wall clock.

    ``prompts_per_s`` = recorded prompts (ok + error) / wall; ``ok_per_s`` =
    successful prompts / wall; ``completion_tokens_per_s`` and
    ``total_tokens_per_s`` (prompt + completion) / wall.
    """
    prompt = int(new_tokens(df, "prompt_tokens").sum())
    completion = int(new_tokens(df, "completion_tokens").sum())
    sent_ok = int((ok_mask(df).to_numpy(dtype=bool) & ~cache_hits(df)).sum())
    tokens = {
        "prompt": prompt,
        "completion": completion,
        "total": prompt + completion,
        "mean_completion_per_ok": safe_ratio(float(completion), float(sent_ok)),
    }
    throughput = {
        "prompts_per_s": safe_ratio(float(counts["prompts"]), wall_s),
        "ok_per_s": safe_ratio(float(counts["ok"]), wall_s),
        "completion_tokens_per_s": safe_ratio(float(completion), wall_s),
        "total_tokens_per_s": safe_ratio(float(prompt + completion), wall_s),
    }
    return tokens, throughput


def _cache(df: pd.DataFrame, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The response cache's part: ``hits`` (rows answered from it, no request sent), ``misses``
    (asked, not found: sent), ``not_asked`` (sampled answers the cache does not keep, rows that
    never reached a worker), ``hit_rate`` = hits / (hits + misses), ``tokens_saved`` (the hits'
    prompt and completion tokens, which ``tokens`` leaves out) and ``request_s_saved`` (the sum of
    the hits' original latency). ``None`` when the run had no cache and no row was asked.
    """
    hits = cache_hits(df)
    asked = df["cached"].notna().to_numpy(dtype=bool) if "cached" in df.columns else hits
    if not asked.any() and not run.get("cache"):
        return None
    prompt = int(df.loc[hits, "prompt_tokens"].fillna(0).sum())
    completion = int(df.loc[hits, "completion_tokens"].fillna(0).sum())
    n_hits, n_asked = int(hits.sum()), int(asked.sum())
    saved = df.loc[hits, "cached_latency_s"] if "cached_latency_s" in df.columns else pd.Series(dtype=float)
    settings = run.get("cache") or {}
    return {
        "dir": settings.get("dir"),
        "mode": settings.get("mode"),
        "hits": n_hits,
        "misses": n_asked - n_hits,
        "not_asked": len(df) - n_asked,
        "hit_rate": safe_ratio(float(n_hits), float(n_asked)),
        "tokens_saved": {"prompt": prompt, "completion": completion, "total": prompt + completion},
        "request_s_saved": float(saved.fillna(0).sum()),
    }


def _latency(df: pd.DataFrame) -> dict[str, Any] | None:
    """``latency_s`` of successful rows: count, p50/p95/p99, mean, min, max. ``None`` without one."""
    values = df.loc[ok_mask(df), "latency_s"].dropna().to_numpy(dtype=float)
    if values.size == 0:
        return None
    return {
        "n": int(values.size),
        **percentiles_of(values, {"p50": 50, "p95": 95, "p99": 99}),
        "mean": as_number(values.mean()),
        "min": as_number(values.min()),
        "max": as_number(values.max()),
    }


def _queue(df: pd.DataFrame) -> dict[str, Any] | None:
    """``queue_s`` (submitted -> started) of every row that has one: p50/p95, mean, max."""
    values = df["queue_s"].dropna().to_numpy(dtype=float)
    if values.size == 0:
        return None
    return {
        "n": int(values.size),
        **percentiles_of(values, {"p50": 50, "p95": 95}),
        "mean": as_number(values.mean()),
        "max": as_number(values.max()),
    }


def _efficiency(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> dict[str, Any]:
    """``parallel_efficiency`` = busy agent-seconds / (``agent_slots`` x wall_s).

    Busy agent-seconds is the sum of ``latency_s`` over every row (ok and
    failed). 1.0 means every slot had a request in flight for the whole wall clock.
    """
    busy = float(df["latency_s"].fillna(0).sum())
    slots = agent_slots(run)
    capacity = slots * wall_s if slots and wall_s else None
    return {"busy_agent_s": busy, "agent_slots": slots, "parallel_efficiency": safe_ratio(busy, capacity)}


def _server_time(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> dict[str, Any] | None:
    """Where the latency went at the model server, from its per-response timings (llama-server's).

    ``queue_s`` is the time requests waited for one of the server's slots (latency minus
    the server's prompt and generation time), ``prompt_s`` and ``generation_s`` its work,
    summed over the rows that have timings. ``queue_share`` = queue_s / their latency.
    ``work_efficiency`` is ``parallel_efficiency`` without that waiting: (busy agent-seconds
    - queue_s) / (agent_slots x wall_s); a saturated server, whose client slots mostly wait
    in its queue, shows a high parallel efficiency and a low work efficiency. ``None``
    when no row has timings (servers other than llama-server).
    """
    has = df["server_queue_s"].notna()
    n = int(has.sum())
    if n == 0:
        return None
    queue = df.loc[has, "server_queue_s"].to_numpy(dtype=float)
    latency = float(df.loc[has, "latency_s"].fillna(0).sum())
    busy = float(df["latency_s"].fillna(0).sum())
    slots = agent_slots(run)
    capacity = slots * wall_s if slots and wall_s else None
    return {
        "n": n,
        "queue_s": as_number(queue.sum()),
        "prompt_s": as_number(df.loc[has, "server_prompt_s"].fillna(0).sum()),
        "generation_s": as_number(df.loc[has, "server_generation_s"].fillna(0).sum()),
        "queue_share": safe_ratio(float(queue.sum()), latency),
        **{f"queue_{k}": v for k, v in percentiles_of(queue, {"p50": 50, "p95": 95}).items()},
        "work_agent_s": as_number(busy - float(queue.sum())),
        "work_efficiency": safe_ratio(busy - float(queue.sum()), capacity),
    }
