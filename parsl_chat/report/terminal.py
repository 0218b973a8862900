"""The efficiency report as rich tables in the terminal."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from .format import (
    COMPARISON_HEADERS,
    DASH,
    LATENCY_HEADERS,
    MAX_TERMINAL_ROWS,
    UNFINISHED_DETAIL,
    cache_brief,
    comparison_cells,
    error_brief,
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_s,
    latency_rows,
    natural_key,
    share_of,
    short_list,
)

__all__ = ["render_comparison", "render_terminal"]


def render_terminal(summary: Mapping[str, Any], console: Console) -> None:
    """Print the run's efficiency report as rich tables.

    Sections: header and notes (partial runs), overview (counts, wall time,
    rates, parallel efficiency), failures by type, latency and queue wait,
    agents, nodes, workers, allocation, cost, slowest prompts. Sections with no
    data say why instead of printing an empty table.
    """
    run = summary["run"]
    title = f"parsl-chat report · {run.get('run_id') or 'run'}"
    details = " · ".join(str(x) for x in (run.get("status"), run.get("executor"), f"rows from {run.get('source')}") if x)
    console.rule(f"[bold]{title}[/]")
    console.print(details, style="dim", highlight=False)
    for note in run.get("notes") or []:
        console.print(f"[yellow]![/] {note}", highlight=False)
    counts = summary["counts"]
    if counts["prompts"] == 0:
        console.print("[yellow]No prompts recorded in this run: nothing to measure yet.[/]")
    console.print()
    _emit(console, _overview_table(summary))
    sections = (
        _errors_table,
        _structured_table,
        _latency_table,
        partial(_agents_table, narrow=console.width < 110),
        _nodes_table,
        _workers_table,
        _allocation_tables,
        _cost_table,
        _slowest_table,
    )
    for section in sections:
        for item in section(summary):
            _emit(console, item)


def _emit(console: Console, item: Any) -> None:
    """Print a table, then its caption as a dim line of its own (a rich caption would wrap at the table's width)."""
    caption = item.caption if isinstance(item, Table) else None
    if isinstance(item, Table):
        item.caption = None
    console.print(item)
    if caption:
        console.print(f"  {caption}", style="dim", highlight=False, markup=False)
    console.print()


def _table(title: str, *columns: str, caption: str | None = None) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        caption=caption,
        caption_justify="left",
    )
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    return table


def _overview_table(summary: Mapping[str, Any]) -> Table:
    counts, rates, tokens = summary["counts"], summary["throughput"], summary["tokens"]
    table = Table(title="Overview", title_justify="left", title_style="bold", box=None, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("detail", style="dim")
    failed = counts["error"]
    table.add_row("prompts", fmt_int(counts["prompts"]), f"{counts['retried']:,} retried" if counts["retried"] else "")
    table.add_row("ok", f"[green]{counts['ok']:,}[/]", fmt_pct(counts["ok"] / counts["prompts"]) if counts["prompts"] else "")
    table.add_row("failed", f"[red]{failed:,}[/]" if failed else "0", error_brief(counts))
    if counts.get("unfinished"):
        table.add_row("unfinished", f"[yellow]{counts['unfinished']:,}[/]", UNFINISHED_DETAIL)
    table.add_row("wall time", fmt_s(summary["wall_s"]), summary["wall"]["basis"])
    table.add_row("prompts/s", fmt_num(rates["prompts_per_s"]), f"ok/s {fmt_num(rates['ok_per_s'])}")
    table.add_row(
        "tokens/s", fmt_num(rates["completion_tokens_per_s"]), f"completion; {fmt_num(rates['total_tokens_per_s'])} incl. prompt"
    )
    table.add_row("tokens", fmt_int(tokens["total"]), f"{tokens['prompt']:,} prompt + {tokens['completion']:,} completion")
    cache = summary.get("cache")
    if cache:
        table.add_row("cache hits", fmt_int(cache["hits"]), cache_brief(cache))
    slots = summary.get("agent_slots")
    table.add_row(
        "parallel efficiency",
        _pct_style(summary["parallel_efficiency"]),
        f"{fmt_num(summary['busy_agent_s'])} busy agent-s / ({slots or '?'} slots x wall)",
    )
    server = summary.get("server_time")
    if server:
        table.add_row(
            "server slot wait",
            fmt_pct(server["queue_share"]),
            f"of latency waiting for a model-server slot (p50 {fmt_s(server['queue_p50'])}); "
            f"efficiency without it {fmt_pct(server['work_efficiency'])}",
        )
    return table


def _pct_style(value: float | None) -> str:
    if value is None:
        return DASH
    colour = "green" if value >= 0.8 else "yellow" if value >= 0.5 else "red"
    return f"[{colour}]{fmt_pct(value)}[/]"


def _failed(n: int) -> str:
    return f"[red]{n:,}[/]" if n else "0"


def _errors_table(summary: Mapping[str, Any]) -> list[Any]:
    errors = summary["errors"]
    if not errors:
        return [] if summary["counts"]["prompts"] == 0 else ["[green]No failed prompts.[/]"]
    table = _table("Failures by type", "error type", "count", "example")
    table.columns[2].justify = "left"
    table.columns[2].overflow = "ellipsis"
    table.columns[2].no_wrap = True
    table.columns[2].max_width = 70
    for entry in errors:
        table.add_row(entry["error_type"], f"{entry['count']:,}", entry["example"] or "")
    return [table]


def _structured_table(summary: Mapping[str, Any]) -> list[Any]:
    rows = summary.get("structured")
    if not rows:
        return []
    table = _table(
        "Structured output",
        "agent",
        "model",
        "answers",
        "valid",
        "invalid_output",
        "invalid rate",
        caption="invalid_output: every answer, asked again up to limits.max_invalid_retries times, failed its schema",
    )
    table.columns[1].justify = "left"
    for r in rows:
        rate = r["invalid_output_rate"]
        shown = f"[red]{fmt_pct(rate)}[/]" if rate else fmt_pct(rate)
        table.add_row(r["agent"], r["model"], fmt_int(r["answers"]), fmt_int(r["valid"]), fmt_int(r["invalid_output"]), shown)
    return [table]


def _latency_table(summary: Mapping[str, Any]) -> list[Any]:
    if summary["counts"]["prompts"] == 0:
        return []
    out: list[Any] = []
    rows = latency_rows(summary)
    if rows:
        table = _table("Latency and queue wait", *LATENCY_HEADERS)
        for row in rows:
            table.add_row(*row)
        out.append(table)
    if not summary["latency_s"]:
        out.append("[yellow]No successful prompts: latency not available.[/]")
    return out


def _agents_table(summary: Mapping[str, Any], *, narrow: bool = False) -> list[Any]:
    """Per-agent table; ``narrow`` (terminals under 110 columns) leaves out model, slots, ok and busy."""
    agents = summary["agents"]
    if not agents:
        return []
    columns: list[tuple[str, Callable[[Mapping[str, Any]], str], bool]] = [
        ("agent", lambda a: str(a["agent"]), True),
        ("model", lambda a: str(a["model"] or DASH), False),
        ("slots", lambda a: fmt_int(a["concurrency"]), False),
        ("prompts", lambda a: fmt_int(a["prompts"]), True),
        ("ok", lambda a: fmt_int(a["ok"]), False),
        ("failed", lambda a: _failed(a["error"]), True),
        ("busy", lambda a: fmt_s(a["busy_s"]), False),
        ("utilisation", lambda a: _pct_style(a["utilisation"]), True),
        ("tok/s", lambda a: fmt_num(a["completion_tokens_per_s"]), True),
        ("p50", lambda a: fmt_s(a["latency_p50_s"]), True),
        ("p95", lambda a: fmt_s(a["latency_p95_s"]), True),
    ]
    shown = [c for c in columns if c[2] or not narrow]
    table = _table("Agents", *(c[0] for c in shown), caption="utilisation = busy seconds / (agent slots x wall time)")
    if not narrow:
        table.columns[1].justify = "left"
    for a in agents:
        table.add_row(*(c[1](a) for c in shown))
    return [table]


def _nodes_table(summary: Mapping[str, Any]) -> list[Any]:
    nodes = summary["nodes"]
    if not nodes:
        return []
    caption = "share = share of prompts; active = time with a request in flight / wall"
    if len(nodes) > MAX_TERMINAL_ROWS:
        shown = sorted(nodes, key=lambda n: -n["prompts"])[:MAX_TERMINAL_ROWS]
        caption += f"; busiest {len(shown)} of {len(nodes)} nodes shown"
    else:
        shown = sorted(nodes, key=lambda n: natural_key(n["node"]))
    table = _table("Nodes", "node", "workers", "prompts", "share", "failed", "busy", "active", "tok/s", caption=caption)
    for n in shown:
        table.add_row(
            n["node"],
            fmt_int(n["workers"]),
            fmt_int(n["prompts"]),
            fmt_pct(n["share_prompts"]),
            _failed(n["error"]),
            fmt_s(n["busy_s"]),
            _pct_style(n["active_fraction"]),
            fmt_num(n["completion_tokens_per_s"]),
        )
    return [table]


def _workers_table(summary: Mapping[str, Any]) -> list[Any]:
    workers = summary["workers"]
    if not workers:
        return []
    utils = [w["utilisation"] for w in workers if w["utilisation"] is not None]
    caption = "utilisation = busy seconds / (request slots per worker x wall time)"
    if len(workers) > MAX_TERMINAL_ROWS:
        shown = sorted(workers, key=lambda w: w["utilisation"] or 0.0)[: MAX_TERMINAL_ROWS // 2]
        caption += (
            f"; {len(workers)} workers, utilisation min {fmt_pct(min(utils) if utils else None)}, "
            f"median {fmt_pct(float(np.median(utils)) if utils else None)}, max {fmt_pct(max(utils) if utils else None)};"
            f" the {len(shown)} least used shown"
        )
    else:
        shown = sorted(workers, key=lambda w: (natural_key(w["node"]), natural_key(w["worker"])))
    table = _table("Workers", "worker", "node", "prompts", "failed", "busy", "utilisation", caption=caption)
    table.columns[1].justify = "left"
    for w in shown:
        table.add_row(
            w["worker"], w["node"], fmt_int(w["prompts"]), _failed(w["error"]), fmt_s(w["busy_s"]), _pct_style(w["utilisation"])
        )
    return [table]


def _allocation_tables(summary: Mapping[str, Any]) -> list[Any]:
    alloc = summary["allocation"]
    if not alloc:
        return []
    head = _table("Allocation", "", "node-seconds", "node-hours", "share")
    allocated = alloc["node_s_allocated"]
    head.add_row("allocated", fmt_num(allocated), fmt_num(allocated / 3600), "100%" if allocated else DASH)
    head.add_row(
        "busy (requests in flight)",
        fmt_num(alloc["node_s_busy"]),
        fmt_num(alloc["node_s_busy"] / 3600),
        _pct_style(alloc["busy_fraction"]),
    )
    head.add_row(
        "idle",
        fmt_num(alloc["node_s_idle"]),
        fmt_num(alloc["node_s_idle"] / 3600),
        fmt_pct(share_of(alloc["node_s_idle"], allocated)),
    )
    head.caption = f"jobs {', '.join(alloc['job_ids']) or DASH}; {len(alloc['nodes'])} node(s): {short_list(alloc['nodes'])}"
    blocks = _table(
        "Blocks",
        "block",
        "job id",
        "nodes",
        "queue wait",
        "duration",
        "node-s",
        "prompts",
        caption=("queue wait = first request started - block submitted; duration = block start (or first request) to block end"),
    )
    for b in alloc["blocks"]:
        blocks.add_row(
            b["block"],
            b["job_id"] or DASH,
            str(len(b["nodes"])),
            fmt_s(b["queue_wait_s"]),
            fmt_s(b["duration_s"]),
            fmt_num(b["allocated_node_s"]),
            fmt_int(b["prompts"]),
        )
    return [head, blocks]


def _cost_table(summary: Mapping[str, Any]) -> list[Any]:
    cost = summary["cost"]
    if not cost:
        return []
    table = _table("Cost", "", "value")
    if cost["unit"] == "SU":
        table.add_row("service units", fmt_num(cost["su"], "SU"))
        table.add_row("node-hours", fmt_num(cost["node_hours"]))
        table.add_row("SU per 1M tokens", fmt_num(cost["su_per_1m_tokens"]))
        table.add_row("SU per 1000 ok prompts", fmt_num(cost["su_per_1k_ok_prompts"]))
        table.caption = f"{cost['su_per_node_hour']} SU per node-hour x {cost['basis']}"
    else:
        table.add_row("USD", f"${cost['usd']:,.4f}")
        table.add_row("USD per 1M tokens", fmt_num(cost["usd_per_1m_tokens"]))
        table.add_row("USD per 1000 ok prompts", fmt_num(cost["usd_per_1k_ok_prompts"]))
        table.caption = (
            f"${cost['usd_per_1m_prompt_tokens']}/1M prompt + ${cost['usd_per_1m_completion_tokens']}/1M completion tokens"
        )
    return [table]


def _slowest_table(summary: Mapping[str, Any]) -> list[Any]:
    slowest = summary["slowest"]
    if not slowest:
        return []
    table = _table("Slowest prompts", "custom_id", "agent", "node", "status", "attempts", "latency")
    for col in (1, 2, 3):
        table.columns[col].justify = "left"
    for s in slowest:
        status = s["status"] if s["status"] == "ok" else f"[red]{s['status']}[/]"
        table.add_row(
            s["custom_id"], s["agent"] or DASH, s["node"] or DASH, status, fmt_int(s["attempts"]), fmt_s(s["latency_s"])
        )
    return [table]


def render_comparison(table: pd.DataFrame, console: Console) -> None:
    """Print the scaling table of :func:`parsl_chat.analysis.compare`."""
    if table.empty:
        console.print("[yellow]No runs to compare.[/]")
        return
    resource = str(table["resource"].iloc[0])
    base = table.iloc[0]
    out = _table(
        "Scaling comparison",
        *COMPARISON_HEADERS,
        caption=(
            f"baseline: {base['run_id']}; speedup = ok/s ÷ baseline ok/s; ideal = {resource} ÷ baseline {resource}; "
            "scaling eff. = speedup ÷ ideal; parallel eff. = busy agent-seconds ÷ (agent slots × wall) within each run"
        ),
    )
    for r in table.to_dict("records"):
        out.add_row(*comparison_cells(r, _failed, _pct_style))
    _emit(console, out)
