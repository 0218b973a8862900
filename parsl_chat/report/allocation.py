"""The scheduler allocation's use: its blocks, and node-seconds allocated, busy and idle."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .intervals import union_by_group
from .rows import place_labels, run_meta
from .values import iso_text, parse_time, safe_ratio

__all__ = ["allocation_summary"]


def _block_rows(df: pd.DataFrame, block: Mapping[str, Any]) -> pd.Series:
    """Rows that ran on ``block``, started while it was up: each driver of a resumed run numbers
    its blocks from 0 again. Rows with the same ``block`` id; for a block without an id (a
    driver's own process: ``--no-parsl``, a warm start's first chunks), rows without one on its nodes."""
    name = block.get("block")
    if name is not None:
        rows = (df["block"] == str(name)).fillna(False)
    else:
        nodes = [str(n) for n in block.get("nodes") or []]
        rows = df["block"].isna() & place_labels(df).isin(nodes)
    began, ended = parse_time(block.get("submitted_at")), parse_time(block.get("ended_at"))
    started = pd.to_datetime(df["started_at"], utc=True)
    if began is not None:
        rows &= (started >= began).fillna(False)
    if ended is not None:
        rows &= (started <= ended).fillna(False)
    return rows


def allocation_summary(df: pd.DataFrame, wall: Mapping[str, Any]) -> dict[str, Any] | None:
    """Scheduler allocation use, when ``run.json`` lists blocks with a job id or nodes.

    Per block: ``start`` = block ``started_at`` if run.json has it, else the
    first ``started_at`` of a request on the block (an approximation: node
    start-up before the first request is not counted), else its
    ``submitted_at``; ``end`` = block ``ended_at``, else run end (wall clock
    end); ``allocated_node_s`` = nodes x (end - start); ``queue_wait_s`` =
    first request ``started_at`` on the block - block ``submitted_at``.
    Per node: ``allocated_s`` (sum over its blocks), ``busy_s`` = union of its
    request intervals (time with at least one request in flight), ``idle_s``
    = allocated - busy (not below 0). Totals: ``node_s_allocated``,
    ``node_s_busy``, ``node_s_idle``, ``busy_fraction`` = busy / allocated.
    """
    run = run_meta(df)
    blocks = [b for b in run.get("blocks") or [] if isinstance(b, dict) and (b.get("job_id") or b.get("nodes"))]
    if not blocks:
        return None
    run_end = parse_time(wall.get("end"))
    place = place_labels(df)
    node_alloc: dict[str, float] = {}
    out_blocks = []
    block_rows = [_block_rows(df, block) for block in blocks]
    for block, rows in zip(blocks, block_rows, strict=True):
        entry, nodes = _block_entry(df, block, rows, place, run_end)
        out_blocks.append(entry)
        for node in nodes:
            node_alloc[node] = node_alloc.get(node, 0.0) + (entry["duration_s"] or 0.0)
    on_blocks = np.logical_or.reduce([rows.to_numpy(dtype=bool) for rows in block_rows])
    # busy: only the requests that ran on the blocks counted as allocated (not a warm start's driver)
    union = union_by_group(place[on_blocks], df["started_at"][on_blocks], df["finished_at"][on_blocks])
    per_node: list[dict[str, Any]] = []
    for node, allocated in node_alloc.items():
        busy = union.get(node, 0.0)
        per_node.append({"node": node, "allocated_s": allocated, "busy_s": busy, "idle_s": max(0.0, allocated - busy)})
    allocated_total = float(sum(n["allocated_s"] for n in per_node))
    busy_total = float(sum(n["busy_s"] for n in per_node))
    job_ids = [str(b["job_id"]) for b in blocks if b.get("job_id")]
    job_ids += sorted(set(df["job_id"].dropna().astype(str)) - set(job_ids))
    return {
        "job_ids": job_ids,
        "nodes": list(node_alloc),
        "blocks": out_blocks,
        "per_node": per_node,
        "node_s_allocated": allocated_total,
        "node_s_busy": busy_total,
        "node_s_idle": float(sum(n["idle_s"] for n in per_node)),
        "busy_fraction": safe_ratio(busy_total, allocated_total),
    }


def _block_entry(
    df: pd.DataFrame, block: Mapping[str, Any], rows: pd.Series, place: pd.Series, run_end: pd.Timestamp | None
) -> tuple[dict[str, Any], list[str]]:
    nodes = [str(n) for n in block.get("nodes") or []] or sorted(set(place[rows]))
    submitted = parse_time(block.get("submitted_at"))
    first = df.loc[rows, "started_at"].min()
    first_start = None if pd.isna(first) else pd.Timestamp(first)
    last = df.loc[rows, "finished_at"].max()
    if parse_time(block.get("started_at")) is not None:
        start, start_basis = parse_time(block.get("started_at")), "block started_at"
    elif first_start is not None:
        start, start_basis = first_start, "first request started_at"
    else:
        start, start_basis = submitted, "block submitted_at"
    end, end_basis = parse_time(block.get("ended_at")), "block ended_at"
    if end is None:
        end, end_basis = run_end, "run end"
    if end is None and not pd.isna(last):
        end, end_basis = pd.Timestamp(last), "last request finished_at"
    duration = max(0.0, (end - start).total_seconds()) if start is not None and end is not None else None
    queue = (first_start - submitted).total_seconds() if first_start is not None and submitted is not None else None
    entry = {
        "block": str(block.get("block")),
        "job_id": None if block.get("job_id") is None else str(block.get("job_id")),
        "nodes": nodes,
        "cores_per_node": block.get("cores_per_node"),
        "prompts": int(rows.sum()),
        "submitted_at": iso_text(submitted),
        "start": iso_text(start),
        "start_basis": start_basis,
        "end": iso_text(end),
        "end_basis": end_basis,
        "duration_s": duration,
        "queue_wait_s": queue,
        "allocated_node_s": len(nodes) * duration if duration is not None else None,
    }
    return entry, nodes
