"""The scaling table of several runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from .summary import summarize
from .values import as_number, safe_ratio

__all__ = ["compare"]


def _nodes_used(summary: Mapping[str, Any]) -> int | None:
    """Nodes of the run: the allocation's nodes, else distinct nodes in the rows."""
    allocation = summary.get("allocation")
    if allocation and allocation.get("nodes"):
        return len(allocation["nodes"])
    return len(summary["nodes"]) or None


def compare(runs: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Scaling table: one row per run, the first run is the baseline.

    ``speedup`` = ok_per_s / ok_per_s of the baseline (successful prompts per
    second; equal to the wall-time ratio when the runs did the same prompts).
    ``resource`` says what is scaled: ``nodes`` when the runs differ in node
    count, else ``agent_slots`` (``workers`` when slots are unknown).
    ``ideal_speedup`` = resources / baseline resources; ``efficiency`` =
    speedup / ideal_speedup (1.0 = perfect scaling).
    """
    summaries = [summarize(df) for df in runs]
    columns = [
        "run_id",
        "run_dir",
        "status",
        "prompts",
        "ok",
        "nodes",
        "workers",
        "agent_slots",
        "wall_s",
        "prompts_per_s",
        "ok_per_s",
        "parallel_efficiency",
        "resource",
        "resources",
        "speedup",
        "ideal_speedup",
        "efficiency",
    ]
    if not summaries:
        return pd.DataFrame(columns=columns)
    rows = [_compare_row(s) for s in summaries]
    resource = _scaled_resource(rows)
    base = rows[0]
    for row in rows:
        row["resource"] = resource
        row["resources"] = row[resource]
        row["speedup"] = safe_ratio(row["ok_per_s"], base["ok_per_s"])
        row["ideal_speedup"] = safe_ratio(as_number(row["resources"]), as_number(base["resources"]))
        row["efficiency"] = safe_ratio(row["speedup"], row["ideal_speedup"])
    table = pd.DataFrame(rows, columns=columns)
    for column in ("wall_s", "prompts_per_s", "ok_per_s", "parallel_efficiency", "speedup", "ideal_speedup", "efficiency"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    for column in ("nodes", "workers", "agent_slots", "resources"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


def _compare_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    run = summary["run"]
    workers = run.get("workers") or len(summary["workers"]) or None
    return {
        "run_id": run.get("run_id"),
        "run_dir": run.get("run_dir"),
        "status": run.get("status"),
        "prompts": summary["counts"]["prompts"],
        "ok": summary["counts"]["ok"],
        "nodes": _nodes_used(summary),
        "workers": workers,
        "agent_slots": summary.get("agent_slots"),
        "wall_s": summary["wall_s"],
        "prompts_per_s": summary["throughput"]["prompts_per_s"],
        "ok_per_s": summary["throughput"]["ok_per_s"],
        "parallel_efficiency": summary["parallel_efficiency"],
    }


def _scaled_resource(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    nodes = {r["nodes"] for r in rows}
    if len(nodes) > 1 and None not in nodes:
        return "nodes"
    if all(r["agent_slots"] for r in rows):
        return "agent_slots"
    if all(r["workers"] for r in rows):
        return "workers"
    return "nodes"
