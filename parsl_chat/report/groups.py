"""The per-group tables of the summary: agents, nodes, workers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from .intervals import union_by_group
from .rows import agent_slots, distinct_pairs, group_records, label_codes, ok_mask, place_labels, ran_rows
from .values import percentiles_of, safe_ratio

__all__ = ["agent_table", "node_table", "worker_table"]


def agent_table(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per agent (those of ``run.json`` first, then any other seen in the rows).

    ``utilisation`` = busy_s / (agent ``concurrency`` x wall_s): the fraction
    of the agent's slots in use on average. Latency percentiles over its ok rows.
    """
    declared = {str(a.get("name")): a for a in (run.get("agents") or []) if isinstance(a, dict) and a.get("name")}
    key = label_codes(df["agent"], "unknown")
    groups = {str(r["agent"]): r for r in group_records(df, {"agent": key})}
    names = list(declared) + sorted(set(groups) - set(declared))
    empty = {"prompts": 0, "ok": 0, "error": 0, "busy_s": 0.0, "completion_tokens": 0}
    ok = ok_mask(df)
    out = []
    for name in names:
        row = groups.get(name, empty)
        meta = declared.get(name, {})
        busy = float(row["busy_s"])
        concurrency = meta.get("concurrency")
        lat = df.loc[(key == name) & ok, "latency_s"].dropna().to_numpy(dtype=float)
        models = df.loc[key == name, "model"].dropna().unique()
        ctokens = int(row["completion_tokens"])
        out.append(
            {
                "agent": name,
                "model": meta.get("model") or (str(models[0]) if len(models) else None),
                "concurrency": concurrency,
                "weight": meta.get("weight"),
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": busy,
                "utilisation": safe_ratio(busy, concurrency * wall_s if concurrency and wall_s else None),
                "completion_tokens": ctokens,
                "completion_tokens_per_s": safe_ratio(float(ctokens), wall_s),
                "latency_p50_s": percentiles_of(lat, {"p": 50})["p"],
                "latency_p95_s": percentiles_of(lat, {"p": 95})["p"],
            }
        )
    return out


def node_table(df: pd.DataFrame, wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per node (``node``, else ``hostname``).

    Only rows that reached a worker count (see :func:`ran_rows`).
    ``share_prompts`` = its prompts / prompts on all nodes; ``share_busy`` =
    its busy seconds / all busy seconds; ``active_s`` = union of its request
    intervals (time with at least one request in flight); ``active_fraction``
    = active_s / wall_s; ``workers`` distinct workers seen on it.
    """
    df = ran_rows(df)
    place = place_labels(df)
    records = group_records(df, {"node": place})
    total_busy = float(sum(r["busy_s"] for r in records))
    active = union_by_group(place, df["started_at"], df["finished_at"])
    hostnames: dict[str, set[str]] = {}
    for name, host in distinct_pairs(place, df["hostname"]):
        hostnames.setdefault(name, set()).add(host)
    workers: dict[str, int] = {}
    for name, _ in distinct_pairs(place, df["worker"]):
        workers[name] = workers.get(name, 0) + 1
    out = []
    for row in records:
        name = str(row["node"])
        ctokens = int(row["completion_tokens"])
        node_active = active.get(name, 0.0)
        out.append(
            {
                "node": name,
                "hostnames": sorted(hostnames.get(name, set())),
                "workers": workers.get(name, 0),
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": float(row["busy_s"]),
                "share_prompts": safe_ratio(float(row["prompts"]), float(len(df))),
                "share_busy": safe_ratio(float(row["busy_s"]), total_busy),
                "active_s": node_active,
                "active_fraction": safe_ratio(node_active, wall_s),
                "completion_tokens": ctokens,
                "completion_tokens_per_s": safe_ratio(float(ctokens), wall_s),
            }
        )
    return out


def _slots_per_worker(run: Mapping[str, Any]) -> float | None:
    """Request slots each worker process holds: ``agent_slots`` / ``workers`` (a worker runs many requests at once)."""
    slots, workers = agent_slots(run), run.get("workers")
    if slots and isinstance(workers, (int, float)) and workers > 0:
        return max(1.0, slots / workers)
    return None


def worker_table(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per (node, worker). ``slots``: the requests it may have in flight at once,
    ``agent_slots`` / ``workers`` for a Parsl worker and every agent slot of the run for the
    driver's own process (``run.json`` ``driver_workers``: ``--no-parsl``, and a warm start's
    first chunks); without those in run.json, 1. ``utilisation`` = busy_s / (slots x wall_s):
    1.0 means every slot of the worker was busy the whole run. Rows as in :func:`node_table`."""
    df = ran_rows(df)
    place = place_labels(df)
    worker = label_codes(df["worker"], "unknown")
    per_worker = _slots_per_worker(run) or 1.0
    driver = {str(w) for w in run.get("driver_workers") or []}
    out = []
    for row in group_records(df, {"node": place, "worker": worker}):
        slots = float(agent_slots(run) or per_worker) if str(row["worker"]) in driver else per_worker
        out.append(
            {
                "worker": str(row["worker"]),
                "node": str(row["node"]),
                "slots": slots,
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": float(row["busy_s"]),
                "utilisation": safe_ratio(float(row["busy_s"]), wall_s * slots if wall_s else None),
            }
        )
    return out
