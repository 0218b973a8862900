"""Efficiency reports: rich tables in the terminal, one self-contained HTML file.

The numbers all come from :func:`parsl_chat.analysis.summarize` (the same
function that writes ``summary.json``); this module only presents them. The
HTML report embeds every plot as a base64 PNG drawn with matplotlib's Agg
renderer, so the file opens offline with no external CSS, scripts or fonts.
Each plot is an ``<img data-plot="NAME">``; an inline script sets
``data-plots-loaded`` / ``data-plots-total`` on ``<body>`` once the images
have decoded (used by the headless-browser test).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table

from ._files import atomic_write
from ._secrets import SECRET_WORDS
from .analysis import compare, load_run, now_utc, seconds_since, summarize
from .errors import OutputError, UsageError

__all__ = [
    "MAX_TIMELINE_BARS",
    "MAX_TIMELINE_LANES",
    "PLOT_NAMES",
    "render_comparison",
    "render_terminal",
    "report_runs",
    "timeline_segments",
    "write_comparison_html",
    "write_html",
]

#: ``data-plot`` names of a run report, in page order (``allocation`` only when the run had one).
PLOT_NAMES = (
    "timeline",
    "inflight",
    "throughput",
    "latency_hist",
    "latency_cdf",
    "agents",
    "nodes",
    "workers",
    "allocation",
    "errors",
)
COMPARISON_PLOT_NAMES = ("speedup", "efficiency", "throughput", "latency_cdf")
MAX_TIMELINE_LANES = 48
MAX_TIMELINE_BARS = 4000
MAX_BAR_ROWS = 40
MAX_TERMINAL_ROWS = 20
DPI = 110
DASH = "—"

# Agent colours: tab10 without its red, which marks failures everywhere.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FAIL = "#d62728"
OK = "#2a9d8f"
IDLE = "#d9d9d9"


# --------------------------------------------------------------------------- formatting


def fmt_s(value: float | None) -> str:
    """A duration for people: ``850 ms``, ``12.3 s``, ``4m 05s``, ``2h 03m``."""
    if value is None or not math.isfinite(value):
        return DASH
    if value == 0:
        return "0 s"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    if abs(value) < 60:
        return f"{value:.3g} s" if abs(value) < 10 else f"{value:.1f} s"
    if abs(value) < 3600:
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes}m {seconds:02d}s"
    hours, rest = divmod(round(value), 3600)
    return f"{hours}h {rest // 60:02d}m"


def fmt_num(value: float | None, unit: str = "") -> str:
    """Three significant figures (thousands separated), optional unit."""
    if value is None or not math.isfinite(value):
        return DASH
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def fmt_int(value: int | float | None) -> str:
    return DASH if value is None else f"{int(value):,}"


def fmt_pct(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value * 100:.1f}%"


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- terminal


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


#: what an unfinished prompt is, where the terminal and HTML reports count them
UNFINISHED_DETAIL = "cut short by the stop, not failed: --resume sends them"


def _overview_table(summary: Mapping[str, Any]) -> Table:
    counts, rates, tokens = summary["counts"], summary["throughput"], summary["tokens"]
    table = Table(title="Overview", title_justify="left", title_style="bold", box=None, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_column("detail", style="dim")
    failed = counts["error"]
    table.add_row("prompts", fmt_int(counts["prompts"]), f"{counts['retried']:,} retried" if counts["retried"] else "")
    table.add_row("ok", f"[green]{counts['ok']:,}[/]", fmt_pct(counts["ok"] / counts["prompts"]) if counts["prompts"] else "")
    table.add_row("failed", f"[red]{failed:,}[/]" if failed else "0", _error_brief(counts))
    if counts.get("unfinished"):
        table.add_row(
            "unfinished", f"[yellow]{counts['unfinished']:,}[/]", "cut short by the stop, not failed: --resume sends them"
        )
    table.add_row("wall time", fmt_s(summary["wall_s"]), summary["wall"]["basis"])
    table.add_row("prompts/s", fmt_num(rates["prompts_per_s"]), f"ok/s {fmt_num(rates['ok_per_s'])}")
    table.add_row(
        "tokens/s", fmt_num(rates["completion_tokens_per_s"]), f"completion; {fmt_num(rates['total_tokens_per_s'])} incl. prompt"
    )
    table.add_row("tokens", fmt_int(tokens["total"]), f"{tokens['prompt']:,} prompt + {tokens['completion']:,} completion")
    slots = summary.get("agent_slots")
    table.add_row(
        "parallel efficiency",
        _pct_style(summary["parallel_efficiency"]),
        f"{fmt_num(summary['busy_agent_s'])} busy agent-s / ({slots or '?'} slots x wall)",
    )
    return table


def _error_brief(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts["errors_by_type"].items(), key=lambda kv: -kv[1]))


def _pct_style(value: float | None) -> str:
    if value is None:
        return DASH
    colour = "green" if value >= 0.8 else "yellow" if value >= 0.5 else "red"
    return f"[{colour}]{fmt_pct(value)}[/]"


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


def _latency_table(summary: Mapping[str, Any]) -> list[Any]:
    latency, queue = summary["latency_s"], summary["queue_s"]
    if summary["counts"]["prompts"] == 0:
        return []
    out: list[Any] = []
    table = _table("Latency and queue wait", "", "p50", "p95", "p99", "mean", "max", "n")
    if latency:
        table.add_row("latency (ok)", *(fmt_s(latency[k]) for k in ("p50", "p95", "p99", "mean", "max")), fmt_int(latency["n"]))
    if queue:
        table.add_row(
            "queue wait",
            fmt_s(queue["p50"]),
            fmt_s(queue["p95"]),
            DASH,
            fmt_s(queue["mean"]),
            fmt_s(queue["max"]),
            fmt_int(queue["n"]),
        )
    if latency or queue:
        out.append(table)
    if not latency:
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


def _failed(n: int) -> str:
    return f"[red]{n:,}[/]" if n else "0"


def _nodes_table(summary: Mapping[str, Any]) -> list[Any]:
    nodes = summary["nodes"]
    if not nodes:
        return []
    caption = "share = share of prompts; active = time with a request in flight / wall"
    if len(nodes) > MAX_TERMINAL_ROWS:
        shown = sorted(nodes, key=lambda n: -n["prompts"])[:MAX_TERMINAL_ROWS]
        caption += f"; busiest {len(shown)} of {len(nodes)} nodes shown"
    else:
        shown = sorted(nodes, key=lambda n: _natural_key(n["node"]))
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
        shown = sorted(workers, key=lambda w: (_natural_key(w["node"]), _natural_key(w["worker"])))
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
        fmt_pct(_share(alloc["node_s_idle"], allocated)),
    )
    head.caption = f"jobs {', '.join(alloc['job_ids']) or DASH}; {len(alloc['nodes'])} node(s): {_short_list(alloc['nodes'])}"
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


def _share(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def _short_list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit})" if len(items) > limit else "")


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
        out.add_row(*_comparison_cells(r, _failed, _pct_style))
    _emit(console, out)


#: the scaling table's columns, in the terminal and in HTML
COMPARISON_HEADERS = (
    "run",
    "status",
    "nodes",
    "workers",
    "slots",
    "prompts",
    "failed",
    "wall",
    "prompts/s",
    "ok/s",
    "parallel eff.",
    "speedup",
    "ideal",
    "scaling eff.",
)


def _comparison_cells(
    r: Mapping[Any, Any], failed: Callable[[int], str] = fmt_int, efficiency: Callable[[float | None], str] = fmt_pct
) -> list[str]:
    """One run's row of :data:`COMPARISON_HEADERS`; the terminal passes colouring formatters."""
    return [
        str(r["run_id"]),
        str(r["status"] or DASH),
        _opt_int(r["nodes"]),
        _opt_int(r["workers"]),
        _opt_int(r["agent_slots"]),
        fmt_int(r["prompts"]),
        failed(int(r["prompts"] - r["ok"])),
        fmt_s(_opt_float(r["wall_s"])),
        fmt_num(_opt_float(r["prompts_per_s"])),
        fmt_num(_opt_float(r["ok_per_s"])),
        efficiency(_opt_float(r["parallel_efficiency"])),
        _times(_opt_float(r["speedup"])),
        _times(_opt_float(r["ideal_speedup"])),
        efficiency(_opt_float(r["efficiency"])),
    ]


def _opt_float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _opt_int(value: Any) -> str:
    return DASH if value is None or pd.isna(value) else f"{int(value):,}"


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


# --------------------------------------------------------------------------- plots


@dataclass
class _Ctx:
    """What every run plot needs: the rows, the summary, the time origin and unit, the agent colours."""

    df: pd.DataFrame
    summary: Mapping[str, Any]
    t0: pd.Timestamp | None
    unit_s: float
    unit: str
    colours: dict[str, str]

    def rel(self, column: str) -> np.ndarray:
        """``column`` as time since the run start, in the display unit."""
        if self.t0 is None:
            return np.full(len(self.df), np.nan)
        return seconds_since(self.df[column], self.t0) / self.unit_s

    @property
    def time_label(self) -> str:
        return f"time since run start ({self.unit})"


def _time_unit(span_s: float) -> tuple[float, str]:
    if span_s <= 600:
        return 1.0, "s"
    if span_s <= 4 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _context(df: pd.DataFrame, summary: Mapping[str, Any]) -> _Ctx:
    start = summary["wall"]["start"]
    t0 = pd.Timestamp(start) if start else None
    if t0 is None and df["started_at"].notna().any():
        t0 = pd.Timestamp(df["started_at"].min())
    span = summary["wall_s"] or 0.0
    if t0 is not None and df["finished_at"].notna().any():
        span = max(span, (pd.Timestamp(df["finished_at"].max()) - t0).total_seconds())
    unit_s, unit = _time_unit(span)
    names = [a["agent"] for a in summary["agents"]]
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    return _Ctx(df=df, summary=summary, t0=t0, unit_s=unit_s, unit=unit, colours=colours)


@contextmanager
def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any) -> Iterator[tuple[Figure, list[Axes]]]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    flat: list[Axes] = [ax for row in axes for ax in row]
    for ax in flat:
        ax.grid(True, color="#e6e6e6", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    yield fig, flat


def _png(fig: Figure) -> tuple[str, int, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    width, height = (round(float(x)) for x in fig.get_size_inches() * DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii"), width, height


def _placeholder(title: str, message: str, width: float = 6.2) -> Figure:
    """A short titled figure saying why there is nothing to plot (keeps every ``data-plot`` present)."""
    with _figure(width, 1.4) as (fig, (ax,)):
        ax.set_title(title, loc="left", fontweight="bold")
        ax.text(0.5, 0.4, message, ha="center", va="center", fontsize=12, color="#666666", transform=ax.transAxes)
        ax.set_axis_off()
    return fig


def timeline_segments(
    df: pd.DataFrame, t0: pd.Timestamp, *, max_lanes: int = MAX_TIMELINE_LANES, max_bars: int = MAX_TIMELINE_BARS
) -> tuple[pd.DataFrame, list[str], int]:
    """Bars of the Gantt timeline: ``(segments, lanes, total_lanes)``.

    One lane per (node, worker), naturally sorted; with more than
    ``max_lanes`` lanes an evenly spaced subset is kept. Requests of the same
    lane, agent and outcome whose gap is below the drawing resolution are
    merged into one bar (``count`` requests), the resolution growing until at
    most ``max_bars`` bars remain. ``segments`` has columns lane, agent,
    failed, start, end (seconds since ``t0``), count.
    """
    rows = df[df["started_at"].notna() & df["finished_at"].notna()]
    lane_of = rows["node"].fillna(rows["hostname"]).fillna("?").astype("str") + " / " + rows["worker"].fillna("?").astype("str")
    all_lanes = sorted(set(lane_of), key=_natural_key)
    lanes = all_lanes
    if len(all_lanes) > max_lanes:
        picks = np.unique(np.linspace(0, len(all_lanes) - 1, max_lanes).round().astype(int))
        lanes = [all_lanes[i] for i in picks]
    keep = lane_of.isin(lanes)
    frame = pd.DataFrame(
        {
            "lane": lane_of[keep].to_numpy(),
            "agent": rows.loc[keep, "agent"].fillna("unknown").astype("str").to_numpy(),
            "failed": (rows.loc[keep, "status"] != "ok").to_numpy(),
            "start": seconds_since(rows.loc[keep, "started_at"], t0),
            "end": seconds_since(rows.loc[keep, "finished_at"], t0),
        }
    )
    if frame.empty:
        return frame.assign(count=pd.Series(dtype="int64")), lanes, len(all_lanes)
    span = max(float(frame["end"].max() - frame["start"].min()), 1e-9)
    resolution = span / 2000 if len(frame) > max_bars else -1.0
    while True:
        segments = _merge_segments(frame, resolution)
        if len(segments) <= max_bars:
            return segments, lanes, len(all_lanes)
        resolution = span / 2000 if resolution <= 0 else resolution * 3


def _merge_segments(frame: pd.DataFrame, gap: float) -> pd.DataFrame:
    """Merge intervals of the same (lane, agent, failed) closer than ``gap`` seconds (``gap < 0``: none)."""
    keys = ["lane", "agent", "failed"]
    sorted_ = frame.sort_values([*keys, "start"], kind="stable").reset_index(drop=True)
    if gap < 0:
        return sorted_.assign(count=1)
    reach = sorted_.groupby(keys, sort=False)["end"].cummax()
    before = reach.groupby([sorted_[k] for k in keys], sort=False).shift(1)
    segment = (before.isna() | (sorted_["start"] > before + gap)).cumsum()
    return (
        sorted_.groupby(segment, sort=False)
        .agg(
            lane=("lane", "first"),
            agent=("agent", "first"),
            failed=("failed", "first"),
            start=("start", "min"),
            end=("end", "max"),
            count=("start", "size"),
        )
        .reset_index(drop=True)
    )


def _plot_timeline(ctx: _Ctx) -> Figure:
    title = "Timeline: every request per worker, coloured by agent"
    if ctx.t0 is None or not ctx.df["started_at"].notna().any():
        return _placeholder(title, "no request started", width=11.5)
    segments, lanes, total = timeline_segments(ctx.df, ctx.t0)
    height = 1.6 + 0.26 * max(len(lanes), 3)
    with _figure(11.5, height) as (fig, (ax,)):
        ypos = {lane: i for i, lane in enumerate(lanes)}
        for (agent, failed), group in segments.groupby(["agent", "failed"], sort=True):
            bars = [(s / ctx.unit_s, max((e - s) / ctx.unit_s, 1e-9)) for s, e in zip(group["start"], group["end"], strict=True)]
            colour = FAIL if failed else ctx.colours.get(str(agent), PALETTE[-1])
            for lane, lane_bars in _by_lane(group["lane"].tolist(), bars).items():
                ax.broken_barh(lane_bars, (ypos[lane] - 0.38, 0.76), facecolors=colour, edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8 if len(lanes) > 24 else 9)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.set_xlim(0, _time_end(ctx))
        ax.set_xlabel(ctx.time_label)
        ax.set_ylabel("node / worker")
        note = []
        if total > len(lanes):
            note.append(f"{len(lanes)} of {total} workers shown")
        if int(segments["count"].sum()) > len(segments):
            note.append(f"{int(segments['count'].sum()):,} requests drawn as {len(segments):,} bars (adjacent requests merged)")
        ax.set_title(title + (f"\n({'; '.join(note)})" if note else ""), loc="left", fontweight="bold")
        ax.legend(
            handles=_agent_handles(
                ctx, set(segments.loc[~segments["failed"], "agent"]), with_failed=bool(segments["failed"].any())
            ),
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            title="agent",
        )
    return fig


def _by_lane(lanes: list[str], bars: list[tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for lane, bar in zip(lanes, bars, strict=True):
        out.setdefault(lane, []).append(bar)
    return out


def _agent_handles(ctx: _Ctx, agents: set[str], *, with_failed: bool) -> list[Any]:
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=c, label=name) for name, c in ctx.colours.items() if name in agents]
    handles += [Patch(color=PALETTE[-1], label=name) for name in sorted(agents - set(ctx.colours))]
    if with_failed:
        handles.append(Patch(color=FAIL, label="failed"))
    return handles


def _time_end(ctx: _Ctx) -> float:
    wall = ctx.summary["wall_s"] or 0.0
    finished = ctx.rel("finished_at")
    last = float(np.nanmax(finished)) if np.isfinite(finished).any() else 0.0
    return max(wall / ctx.unit_s, last, 1e-6)


def inflight_series(starts: np.ndarray, ends: np.ndarray, *, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Requests in flight over time: ``(times, counts)`` for a post-step plot.

    Exact (one point per start/end event) up to ``max_points`` events; beyond
    that the count is sampled on an even grid of ``max_points`` times.
    """
    ok = np.isfinite(starts) & np.isfinite(ends)
    s, e = np.sort(starts[ok]), np.sort(ends[ok])
    if s.size == 0:
        return np.zeros(0), np.zeros(0)
    if 2 * s.size <= max_points:
        times = np.concatenate([s, e])
        steps = np.concatenate([np.ones(s.size), -np.ones(e.size)])
        order = np.lexsort((steps, times))  # ends before starts at the same instant
        return times[order], np.cumsum(steps[order])
    grid = np.linspace(s[0], e[-1], max_points)
    counts = np.searchsorted(s, grid, side="right") - np.searchsorted(e, grid, side="right")
    return grid, counts.astype(float)


def _plot_inflight(ctx: _Ctx) -> Figure:
    title = "Requests in flight"
    with _figure(6.2, 4.4) as (fig, (ax,)):
        times, counts = inflight_series(ctx.rel("started_at"), ctx.rel("finished_at"))
        if times.size == 0:
            return _placeholder(title, "no request started")
        ax.step(
            np.concatenate([[0.0], times]),
            np.concatenate([[0.0], counts]),
            where="post",
            color="#1f77b4",
            linewidth=1.2,
            label="in flight",
        )
        slots = ctx.summary.get("agent_slots")
        if slots:
            ax.axhline(slots, color="#444444", linestyle="--", linewidth=1, label=f"agent slots ({slots})")
        workers = ctx.summary["run"].get("workers")
        if workers and workers != slots:
            ax.axhline(workers, color="#999999", linestyle=":", linewidth=1, label=f"workers ({workers})")
        ax.set_xlim(0, _time_end(ctx))
        ax.set_ylim(0, max(float(counts.max()), float(slots or 0), float(workers or 0)) * 1.12 + 0.5)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel(ctx.time_label)
        ax.set_ylabel("requests in flight")
        ax.legend(loc="lower right", fontsize=8, frameon=True)
    return fig


NICE_BINS_S = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400)


def bin_width_s(span_s: float, max_bins: int = 60) -> float:
    """The smallest 'nice' bin width (seconds) giving at most ``max_bins`` bins over ``span_s``."""
    for width in NICE_BINS_S:
        if span_s / width <= max_bins:
            return float(width)
    return float(math.ceil(span_s / max_bins))


def _plot_throughput(ctx: _Ctx) -> Figure:
    title = "Throughput"
    finished = ctx.rel("finished_at") * ctx.unit_s  # seconds
    ok = (ctx.df["status"] == "ok").to_numpy()
    has = np.isfinite(finished)
    with _figure(6.2, 4.4, rows=2, sharex=True) as (fig, (ax, ax2)):
        if not has.any():
            return _placeholder(title, "no request finished")
        span = _time_end(ctx) * ctx.unit_s
        width = bin_width_s(span, max_bins=int(np.clip(has.sum() / 4, 8, 60)))
        edges = np.arange(0.0, span + width, width)
        ok_counts, _ = np.histogram(finished[has & ok], bins=edges)
        err_counts, _ = np.histogram(finished[has & ~ok], bins=edges)
        tokens = ctx.df["completion_tokens"].fillna(0).to_numpy(dtype=float)
        tok_sums, _ = np.histogram(finished[has], bins=edges, weights=tokens[has])
        left = edges[:-1] / ctx.unit_s
        bar_w = width / ctx.unit_s
        ax.bar(left, ok_counts / width, width=bar_w, align="edge", color=OK, label="ok", edgecolor="white", linewidth=0.3)
        if err_counts.any():
            ax.bar(
                left,
                err_counts / width,
                width=bar_w,
                align="edge",
                bottom=ok_counts / width,
                color=FAIL,
                label="failed",
                edgecolor="white",
                linewidth=0.3,
            )
        ax.set_title(f"Throughput: completions per second ({fmt_s(width)} bins)", loc="left", fontweight="bold")
        ax.set_ylabel("completions/s")
        ax.set_ylim(0, float(((ok_counts + err_counts) / width).max()) * 1.3 + 1e-9)
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        ax2.bar(left, tok_sums / width, width=bar_w, align="edge", color="#6a4c93", edgecolor="white", linewidth=0.3)
        ax2.set_title("Completion tokens per second", loc="left", fontweight="bold", fontsize=10)
        ax2.set_ylabel("tokens/s")
        ax2.set_xlabel(ctx.time_label)
        ax2.set_xlim(0, span / ctx.unit_s)
    return fig


def _ok_latency(df: pd.DataFrame) -> np.ndarray:
    return df.loc[df["status"] == "ok", "latency_s"].dropna().to_numpy(dtype=float)


def _plot_latency_hist(ctx: _Ctx) -> Figure:
    values = _ok_latency(ctx.df)
    title = "Latency of successful requests"
    with _figure(6.2, 3.6) as (fig, (ax,)):
        if values.size == 0:
            return _placeholder(title, "no successful prompts: latency not available")
        lat = ctx.summary["latency_s"]
        low, high = float(values.min()), float(values.max())
        log = low > 0 and high / low > 100
        bins: Any = np.geomspace(low, high, 40) if log else min(50, max(5, int(math.sqrt(values.size)) + 1))
        ax.hist(values, bins=bins, color="#1f77b4", alpha=0.85, edgecolor="white", linewidth=0.4)
        if log:
            ax.set_xscale("log")
        for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax.axvline(lat[key], color="#333333", linestyle=style, linewidth=1.2, label=f"{key} {fmt_s(lat[key])}")
        ax.set_title(f"{title} (n={values.size:,})", loc="left", fontweight="bold")
        ax.set_xlabel("latency (s)" + (", log scale" if log else ""))
        ax.set_ylabel("requests")
        ax.legend(loc="upper right", fontsize=8)
    return fig


def _plot_latency_cdf(ctx: _Ctx) -> Figure:
    values = _ok_latency(ctx.df)
    title = "Latency CDF (successful requests)"
    with _figure(6.2, 3.6) as (fig, (ax,)):
        if values.size == 0:
            return _placeholder(title, "no successful prompts: latency not available")
        _cdf(ax, values, "all agents", "#222222", width=2.0)
        ok = ctx.df[ctx.df["status"] == "ok"]
        if 1 < len(ctx.colours) <= 8:
            for name, colour in ctx.colours.items():
                agent_values = ok.loc[ok["agent"] == name, "latency_s"].dropna().to_numpy(dtype=float)
                if agent_values.size:
                    _cdf(ax, agent_values, name, colour, width=1.2)
        for q in (0.5, 0.95, 0.99):
            ax.axhline(q, color="#bbbbbb", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("fraction of requests ≤ latency")
        ax.legend(loc="lower right", fontsize=8)
    return fig


def _cdf(ax: Axes, values: np.ndarray, label: str, colour: str, *, width: float, points: int = 2000) -> None:
    """Empirical CDF; above ``points`` values it is drawn through ``points`` evenly spaced quantiles."""
    if values.size > points:
        y = np.linspace(0.0, 1.0, points)
        x = np.quantile(values, y)
        ax.plot(x, y, color=colour, linewidth=width, label=label)
        return
    x = np.sort(values)
    y = np.arange(1, x.size + 1) / x.size
    ax.step(np.concatenate([[x[0]], x]), np.concatenate([[0.0], y]), where="post", color=colour, linewidth=width, label=label)


def _plot_groups(
    title: str, entries: Sequence[Mapping[str, Any]], key: str, colours: Mapping[str, str] | None, util_key: str, util_label: str
) -> Figure:
    """Two panels of horizontal bars per group: prompts (ok + failed) and busy time with utilisation."""
    shown = [e for e in entries if e["prompts"]]
    note = ""
    if len(shown) > MAX_BAR_ROWS:
        shown = sorted(shown, key=lambda e: -e["prompts"])[:MAX_BAR_ROWS]
        note = f" (busiest {MAX_BAR_ROWS} of {len(entries)})"
    if not shown:
        return _placeholder(title, "no prompts recorded")
    height = 1.5 + 0.3 * max(len(shown), 2)
    with _figure(6.2, height, cols=2, sharey=True) as (fig, (ax, ax2)):
        names = [str(e[key]) for e in shown]
        y = np.arange(len(names))
        ok = np.array([e["ok"] for e in shown], dtype=float)
        err = np.array([e["error"] for e in shown], dtype=float)
        fill = [colours.get(n, OK) for n in names] if colours else [OK] * len(names)
        ax.barh(y, ok, color=fill, label="ok")
        if err.any():
            ax.barh(y, err, left=ok, color=FAIL, label="failed")
            ax.set_xlim(0, float((ok + err).max()) * 1.05)
        ax.set_yticks(y, names, fontsize=9 if len(names) <= 20 else 7)
        ax.invert_yaxis()
        ax.set_title(
            f"{title}: prompts{note}" + (" (failed in red)" if err.any() else ""), loc="left", fontweight="bold", fontsize=10
        )
        ax.set_xlabel("prompts")
        busy = np.array([e["busy_s"] for e in shown], dtype=float)
        unit_s, unit = _time_unit(float(busy.max()) if busy.size else 0.0)
        ax2.barh(y, busy / unit_s, color=fill)
        for yi, (b, e) in enumerate(zip(busy, shown, strict=True)):
            if e.get(util_key) is not None:
                ax2.text(b / unit_s, yi, f" {fmt_pct(e[util_key])}", va="center", fontsize=8, color="#333333")
        ax2.set_xlim(0, max(float(busy.max()) / unit_s * 1.3, 1e-6))
        ax2.set_title(f"busy time ({util_label})", loc="left", fontweight="bold", fontsize=10)
        ax2.set_xlabel(f"busy time, sum of latencies ({unit})")
    return fig


def _plot_agents(ctx: _Ctx) -> Figure:
    return _plot_groups("Agents", ctx.summary["agents"], "agent", ctx.colours, "utilisation", "label: utilisation")


def _plot_nodes(ctx: _Ctx) -> Figure:
    return _plot_groups("Nodes", ctx.summary["nodes"], "node", None, "active_fraction", "label: time active")


def _plot_workers(ctx: _Ctx) -> Figure:
    workers = sorted(ctx.summary["workers"], key=lambda w: (_natural_key(w["node"]), _natural_key(w["worker"])))
    title = "Worker utilisation (busy time / (slots x wall time))"
    utils = np.array([w["utilisation"] if w["utilisation"] is not None else np.nan for w in workers], dtype=float)
    if not workers or not np.isfinite(utils).any():
        return _placeholder(title, "no worker ran a request" if not workers else "wall time unknown")
    if len(workers) > MAX_BAR_ROWS:
        with _figure(6.2, 3.6) as (fig, (ax,)):
            ax.hist(utils[np.isfinite(utils)] * 100, bins=20, color="#1f77b4", edgecolor="white")
            ax.set_title(f"{title}\n({len(workers)} workers)", loc="left", fontweight="bold")
            ax.set_xlabel("utilisation (%)")
            ax.set_ylabel("workers")
        return fig
    with _figure(6.2, 1.4 + 0.28 * max(len(workers), 2)) as (fig, (ax,)):
        labels = [f"{w['node']} / {w['worker']}" for w in workers]
        y = np.arange(len(labels))
        colours = [OK if u >= 0.8 else "#e9c46a" if u >= 0.5 else "#e76f51" for u in np.nan_to_num(utils)]
        ax.barh(y, utils * 100, color=colours)
        ax.axvline(100, color="#444444", linestyle="--", linewidth=1)
        ax.set_yticks(y, labels, fontsize=9 if len(labels) <= 20 else 7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(105.0, float(np.nanmax(utils)) * 105))
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("utilisation (%)")
        ax.set_ylabel("node / worker")
    return fig


def _plot_allocation(ctx: _Ctx) -> Figure:
    alloc = ctx.summary["allocation"] or {}
    per_node = list(alloc.get("per_node") or [])
    title = "Allocation use per node"
    if len(per_node) > MAX_BAR_ROWS:
        per_node = sorted(per_node, key=lambda n: -n["idle_s"])[:MAX_BAR_ROWS]
        title += f" (the {MAX_BAR_ROWS} idlest nodes)"
    with _figure(6.2, 1.6 + 0.3 * max(len(per_node), 2)) as (fig, (ax,)):
        if not per_node:
            return _placeholder(title, "no node in the allocation")
        names = [n["node"] for n in per_node]
        busy = np.array([n["busy_s"] for n in per_node], dtype=float)
        idle = np.array([n["idle_s"] for n in per_node], dtype=float)
        unit_s, unit = _time_unit(float((busy + idle).max()))
        y = np.arange(len(names))
        ax.barh(y, busy / unit_s, color=OK, label="busy (requests in flight)")
        ax.barh(y, idle / unit_s, left=busy / unit_s, color=IDLE, label="idle")
        ax.set_yticks(y, names, fontsize=9 if len(names) <= 20 else 7)
        ax.invert_yaxis()
        ax.set_title(f"{title}: busy vs idle ({fmt_pct(alloc.get('busy_fraction'))} busy)", loc="left", fontweight="bold")
        ax.set_xlabel(f"allocated node time ({unit})")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _plot_errors(ctx: _Ctx) -> Figure:
    errors = ctx.summary["errors"]
    title = "Failed requests by error type"
    with _figure(6.2, 1.5 + 0.32 * max(len(errors), 2)) as (fig, (ax,)):
        if not errors:
            return _placeholder(title, "no failed requests" if ctx.summary["counts"]["prompts"] else "no prompts recorded")
        names = [e["error_type"] for e in errors]
        counts = [e["count"] for e in errors]
        y = np.arange(len(names))
        ax.barh(y, counts, color=FAIL)
        for yi, c in enumerate(counts):
            ax.text(c, yi, f" {c:,}", va="center", fontsize=9)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlim(0, max(counts) * 1.2)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("failed prompts")
    return fig


RUN_PLOTS: dict[str, Callable[[_Ctx], Figure]] = {
    "timeline": _plot_timeline,
    "inflight": _plot_inflight,
    "throughput": _plot_throughput,
    "latency_hist": _plot_latency_hist,
    "latency_cdf": _plot_latency_cdf,
    "agents": _plot_agents,
    "nodes": _plot_nodes,
    "workers": _plot_workers,
    "allocation": _plot_allocation,
    "errors": _plot_errors,
}

ALT = {
    "timeline": "Gantt chart of every request per worker over time",
    "inflight": "number of requests in flight over time against the agent slots",
    "throughput": "completions and tokens per second over time",
    "latency_hist": "histogram of request latency",
    "latency_cdf": "cumulative distribution of request latency",
    "agents": "prompts and busy time per agent",
    "nodes": "prompts and busy time per node",
    "workers": "utilisation per worker",
    "allocation": "allocated node time busy vs idle per node",
    "errors": "failed prompts per error type",
}


def _img(name: str, fig: Figure, alt: str) -> str:
    data, width, height = _png(fig)
    return (
        f'<img data-plot="{name}" alt="{html.escape(alt)}" width="{width}" height="{height}" src="data:image/png;base64,{data}">'
    )


# --------------------------------------------------------------------------- HTML


CSS = """
:root { --fg:#1d2433; --muted:#5b6474; --line:#e3e6ea; --card:#f6f7f9; --ok:#2a9d8f; --bad:#d62728; --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 14px; }
.badge { display:inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; font-weight:600;
         color:#fff; background:#6c757d; vertical-align: middle; }
.badge.complete { background: var(--ok); } .badge.failed { background: var(--bad); }
.badge.interrupted, .badge.running { background: var(--warn); }
.notes { background:#fff8e6; border:1px solid #f0d58c; border-radius:8px; padding:10px 14px; margin: 8px 0 16px; }
.notes p { margin: 2px 0; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; }
.card { background: var(--card); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 13px; }
.card .v { font-size: 26px; font-weight: 700; line-height: 1.2; margin-top: 2px; }
.card .d { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
.v.good { color: var(--ok); } .v.bad { color: var(--bad); } .v.warn { color: var(--warn); }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 18px; align-items:start; }
figure { margin: 0 0 18px; }
img[data-plot] { max-width: 100%; height: auto; display:block; border:1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; margin: 10px 0 4px; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--card); font-weight: 600; }
th:first-child, td:first-child, td.l, th.l { text-align: left; }
td.wrap { white-space: normal; max-width: 560px; text-align:left; color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 10px; }
pre { background: var(--card); padding: 12px 14px; border-radius: 8px; overflow-x: auto; font-size: 13px; max-height: 520px; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--muted); }
dl.defs { display:grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 14px; }
dl.defs dt { font-weight: 600; } dl.defs dd { margin: 0; color: var(--muted); }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; }
"""

LOADED_SCRIPT = """
(function () {
  function count() {
    var imgs = document.querySelectorAll('img[data-plot]');
    var loaded = 0;
    imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { loaded += 1; } });
    document.body.dataset.plotsLoaded = String(loaded);
    document.body.dataset.plotsTotal = String(imgs.length);
  }
  if (document.readyState === 'complete') { count(); } else { window.addEventListener('load', count); }
})();
"""

DEFINITIONS = (
    (
        "wall time",
        "run start → run end from run.json (driver wall clock); first submitted → last finished when run.json lacks them",
    ),
    ("prompts/s", "prompts recorded (ok + failed) ÷ wall time; ok/s counts successful prompts only"),
    ("tokens/s", "completion tokens ÷ wall time (total tokens/s adds prompt tokens)"),
    ("latency", "finished − started of a request (all its attempts), successful requests only; percentiles interpolate linearly"),
    ("queue wait", "started − submitted of a request"),
    ("busy time", "sum of request latencies (ok and failed)"),
    ("parallel efficiency", "busy agent-seconds ÷ (agent slots × wall time); 100% = every slot always busy"),
    ("utilisation", "agent: busy ÷ (its concurrency × wall); worker: busy ÷ wall"),
    ("node active", "time with at least one request in flight on the node (union of intervals) ÷ wall"),
    (
        "allocation",
        "node-seconds from each block's start (first request if unknown) to its end; "
        "busy = union of request intervals per node; idle = allocated − busy",
    ),
)

_SECRET_KEY = re.compile(rf"(?:^|[_.-]){SECRET_WORDS}$", re.IGNORECASE)
_SECRET_TEXT = (
    # `key: value` / `key=value` lines whose key ends in a secret word (max_tokens does not: it ends in "tokens")
    (
        re.compile(
            rf"(?im)^([ \t]*-?[ \t]*[\"']?(?:[\w.-]*[_.-])?{SECRET_WORDS}[\"']?[ \t]*[:=][ \t]*)"
            r"(?!(?:null|~|''|\"\"|\*+)?[ \t]*$)\S.*$"
        ),
        r"\1'***'",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]+"), "Bearer ***"),
)


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret-looking keys' values and key-like strings replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") and not isinstance(v, (dict, list)) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """``text`` with ``key: value`` lines of secret-looking keys, ``sk-...`` keys and bearer tokens masked."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def _when(iso: str | None, *, clock: bool = False) -> str:
    """An ISO timestamp as ``2024-05-01 12:00:41 UTC`` (whole seconds), or ``12:00:41`` with ``clock``."""
    if not iso:
        return "?"
    return pd.Timestamp(iso).tz_convert("UTC").strftime("%H:%M:%S" if clock else "%Y-%m-%d %H:%M:%S UTC")


def _e(value: Any) -> str:
    return html.escape(DASH if value is None else str(value))


def _card(key: str, value: str, detail: str = "", tone: str = "") -> str:
    return (
        f'<div class="card"><div class="k">{_e(key)}</div><div class="v {tone}">{_e(value)}</div>'
        f'<div class="d">{_e(detail)}</div></div>'
    )


def _tone(value: float | None) -> str:
    if value is None:
        return ""
    return "good" if value >= 0.8 else "warn" if value >= 0.5 else "bad"


def _cards(summary: Mapping[str, Any]) -> str:
    counts, rates, lat = summary["counts"], summary["throughput"], summary["latency_s"]
    prompts = counts["prompts"]
    ok_share = counts["ok"] / prompts if prompts else None
    cards = [
        _card("prompts", fmt_int(prompts), f"{counts['retried']:,} retried"),
        _card("succeeded", fmt_int(counts["ok"]), fmt_pct(ok_share), "good" if counts["error"] == 0 and prompts else ""),
        _card("failed", fmt_int(counts["error"]), _error_brief(counts) or "none", "bad" if counts["error"] else ""),
        *([_card("unfinished", fmt_int(counts["unfinished"]), UNFINISHED_DETAIL)] if counts.get("unfinished") else []),
        _card("wall time", fmt_s(summary["wall_s"]), summary["wall"]["basis"].replace(" -> ", " → ")),
        _card("prompts / s", fmt_num(rates["prompts_per_s"]), f"ok/s {fmt_num(rates['ok_per_s'])}"),
        _card(
            "tokens / s",
            fmt_num(rates["completion_tokens_per_s"]),
            f"completion; {fmt_num(rates['total_tokens_per_s'])} incl. prompt",
        ),
        _card(
            "latency p50", fmt_s(lat["p50"]) if lat else DASH, f"mean {fmt_s(lat['mean'])}" if lat else "no successful prompts"
        ),
        _card(
            "latency p95",
            fmt_s(lat["p95"]) if lat else DASH,
            f"p99 {fmt_s(lat['p99'])}, max {fmt_s(lat['max'])}" if lat else "no successful prompts",
        ),
        _card(
            "parallel efficiency",
            fmt_pct(summary["parallel_efficiency"]),
            f"busy agent-s ÷ ({summary.get('agent_slots') or '?'} slots × wall)",
            _tone(summary["parallel_efficiency"]),
        ),
    ]
    alloc = summary["allocation"]
    if alloc:
        cards.append(
            _card(
                "allocation busy",
                fmt_pct(alloc["busy_fraction"]),
                f"{fmt_num(alloc['node_s_busy'])} of {fmt_num(alloc['node_s_allocated'])} node-s",
                _tone(alloc["busy_fraction"]),
            )
        )
    cost = summary["cost"]
    if cost:
        value = fmt_num(cost["su"], "SU") if cost["unit"] == "SU" else f"${cost['usd']:,.4f}"
        per = cost.get("su_per_1m_tokens") if cost["unit"] == "SU" else cost.get("usd_per_1m_tokens")
        cards.append(_card("cost", value, f"{fmt_num(per)} {cost['unit']} per 1M tokens"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[int] = (0,), wrap: Sequence[int] = ()
) -> str:
    head = "".join(f'<th class="{"l" if i in left or i in wrap else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = "wrap" if i in wrap else "l" if i in left else ""
            cells.append(f'<td class="{cls}">{_e(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _caption(text: str) -> str:
    return f'<p class="caption">{_e(text)}</p>'


def _latency_html(summary: Mapping[str, Any]) -> str:
    lat, queue = summary["latency_s"], summary["queue_s"]
    rows = []
    if lat:
        rows.append(["latency (ok)", *(fmt_s(lat[k]) for k in ("p50", "p95", "p99", "mean", "max")), fmt_int(lat["n"])])
    if queue:
        rows.append(
            [
                "queue wait",
                fmt_s(queue["p50"]),
                fmt_s(queue["p95"]),
                DASH,
                fmt_s(queue["mean"]),
                fmt_s(queue["max"]),
                fmt_int(queue["n"]),
            ]
        )
    out = _html_table(["", "p50", "p95", "p99", "mean", "max", "n"], rows) if rows else ""
    if not lat:
        out += '<p class="notes">No successful prompts: latency not available.</p>'
    return out


def _agents_html(summary: Mapping[str, Any]) -> str:
    rows = [
        [
            a["agent"],
            a["model"],
            fmt_int(a["concurrency"]),
            fmt_int(a["prompts"]),
            fmt_int(a["ok"]),
            fmt_int(a["error"]),
            fmt_s(a["busy_s"]),
            fmt_pct(a["utilisation"]),
            fmt_num(a["completion_tokens_per_s"]),
            fmt_s(a["latency_p50_s"]),
            fmt_s(a["latency_p95_s"]),
        ]
        for a in summary["agents"]
    ]
    headers = ["agent", "model", "slots", "prompts", "ok", "failed", "busy", "utilisation", "tokens/s", "p50", "p95"]
    return _html_table(headers, rows, left=(0, 1)) + _caption("utilisation = busy time ÷ (agent slots × wall time)")


def _nodes_html(summary: Mapping[str, Any]) -> str:
    nodes = sorted(summary["nodes"], key=lambda n: _natural_key(n["node"]))
    rows = [
        [
            n["node"],
            ", ".join(n["hostnames"]),
            fmt_int(n["workers"]),
            fmt_int(n["prompts"]),
            fmt_pct(n["share_prompts"]),
            fmt_int(n["error"]),
            fmt_s(n["busy_s"]),
            fmt_pct(n["share_busy"]),
            fmt_pct(n["active_fraction"]),
            fmt_num(n["completion_tokens_per_s"]),
        ]
        for n in nodes
    ]
    headers = ["node", "hostnames", "workers", "prompts", "share", "failed", "busy", "busy share", "active", "tokens/s"]
    table = _html_table(headers, rows, left=(0, 1))
    if len(nodes) > MAX_TERMINAL_ROWS:
        table = f"<details><summary>all {len(nodes)} nodes</summary>{table}</details>"
    return table + _caption("active = time with at least one request in flight on the node ÷ wall time")


def _workers_html(summary: Mapping[str, Any]) -> str:
    workers = sorted(summary["workers"], key=lambda w: (_natural_key(w["node"]), _natural_key(w["worker"])))
    rows = [
        [w["worker"], w["node"], fmt_int(w["prompts"]), fmt_int(w["error"]), fmt_s(w["busy_s"]), fmt_pct(w["utilisation"])]
        for w in workers
    ]
    table = _html_table(["worker", "node", "prompts", "failed", "busy", "utilisation"], rows, left=(0, 1))
    return f"<details><summary>per-worker table ({len(workers)} workers)</summary>{table}</details>" if workers else ""


def _allocation_html(summary: Mapping[str, Any]) -> str:
    alloc = summary["allocation"]
    if not alloc:
        return ""
    total = alloc["node_s_allocated"]
    head = _html_table(
        ["", "node-seconds", "node-hours", "share"],
        [
            ["allocated", fmt_num(total), fmt_num(total / 3600), "100%" if total else DASH],
            [
                "busy (requests in flight)",
                fmt_num(alloc["node_s_busy"]),
                fmt_num(alloc["node_s_busy"] / 3600),
                fmt_pct(alloc["busy_fraction"]),
            ],
            [
                "idle",
                fmt_num(alloc["node_s_idle"]),
                fmt_num(alloc["node_s_idle"] / 3600),
                fmt_pct(_share(alloc["node_s_idle"], total)),
            ],
        ],
    )
    blocks = _html_table(
        ["block", "job id", "nodes", "submitted", "start", "end", "queue wait", "duration", "node-s", "prompts"],
        [
            [
                b["block"],
                b["job_id"],
                _short_list(b["nodes"]),
                _when(b["submitted_at"], clock=True),
                _when(b["start"], clock=True),
                _when(b["end"], clock=True),
                fmt_s(b["queue_wait_s"]),
                fmt_s(b["duration_s"]),
                fmt_num(b["allocated_node_s"]),
                fmt_int(b["prompts"]),
            ]
            for b in alloc["blocks"]
        ],
        left=(0, 1, 2, 3, 4, 5),
    )
    starts = sorted({b["start_basis"] for b in alloc["blocks"]})
    ends = sorted({b["end_basis"] for b in alloc["blocks"]})
    caption = _caption(
        f"jobs: {', '.join(alloc['job_ids']) or DASH}. Times UTC; start = {' / '.join(starts)}, end = {' / '.join(ends)}. "
        "Queue wait = first request started on the block − block submitted."
    )
    return head + blocks + caption


def _errors_html(summary: Mapping[str, Any]) -> str:
    errors = summary["errors"]
    if not errors:
        return "<p>No failed prompts.</p>" if summary["counts"]["prompts"] else ""
    return _html_table(
        ["error type", "count", "example message"],
        [[e["error_type"], fmt_int(e["count"]), e["example"]] for e in errors],
        wrap=(2,),
    )


def _slowest_html(summary: Mapping[str, Any]) -> str:
    rows = [
        [s["custom_id"], s["agent"], s["node"], s["status"], fmt_int(s["attempts"]), fmt_s(s["latency_s"])]
        for s in summary["slowest"]
    ]
    return (
        _html_table(["custom_id", "agent", "node", "status", "attempts", "latency"], rows, left=(0, 1, 2, 3))
        if rows
        else "<p>No request ran.</p>"
    )


def _cost_html(summary: Mapping[str, Any]) -> str:
    cost = summary["cost"]
    if not cost:
        return ""
    if cost["unit"] == "SU":
        rows = [
            ["service units", fmt_num(cost["su"], "SU")],
            ["node-hours", fmt_num(cost["node_hours"])],
            ["SU per 1M tokens", fmt_num(cost["su_per_1m_tokens"])],
            ["SU per 1000 ok prompts", fmt_num(cost["su_per_1k_ok_prompts"])],
        ]
        note = f"{cost['su_per_node_hour']} SU per node-hour × {cost['basis']}"
    else:
        rows = [
            ["USD", f"${cost['usd']:,.4f}"],
            ["USD per 1M tokens", fmt_num(cost["usd_per_1m_tokens"])],
            ["USD per 1000 ok prompts", fmt_num(cost["usd_per_1k_ok_prompts"])],
        ]
        note = (
            f"${cost['usd_per_1m_prompt_tokens']} per 1M prompt tokens"
            f" + ${cost['usd_per_1m_completion_tokens']} per 1M completion tokens"
        )
    return "<h2>Cost</h2>" + _html_table(["", "value"], rows) + _caption(note)


def _config_html(df: pd.DataFrame) -> str:
    run = df.attrs.get("run") or {}
    parts = ["<h2>Run configuration</h2>", "<h3>run.json</h3>"]
    parts.append(
        f"<pre>{html.escape(json.dumps(redact(run), indent=2, sort_keys=False))}</pre>" if run else "<p>run.json is missing.</p>"
    )
    run_dir = df.attrs.get("run_dir")
    config = Path(str(run_dir)) / "config.yaml" if run_dir else None
    if config is not None and config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        parts += ["<h3>config.yaml</h3>", f"<pre>{html.escape(redact_text(text))}</pre>"]
    return "".join(parts)


def _definitions_html() -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in DEFINITIONS)
    return f'<details><summary>How these numbers are defined</summary><dl class="defs">{items}</dl></details>'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main><script>{LOADED_SCRIPT}</script></body></html>\n"
    )


def _header(summary: Mapping[str, Any]) -> str:
    run = summary["run"]
    status = str(run.get("status") or "unknown")
    meta = [
        f"executor {run.get('executor') or '?'}",
        f"{fmt_int(run.get('workers'))} workers" if run.get("workers") else None,
        f"{summary.get('agent_slots')} agent slots" if summary.get("agent_slots") else None,
        f"routing {run.get('routing')}" if run.get("routing") else None,
        f"{_when(summary['wall']['start'])} → {_when(summary['wall']['end'])}",
        f"rows from {run.get('source')}",
    ]
    out = (
        f'<h1>parsl-chat run report: {_e(run.get("run_id") or "run")} <span class="badge {_e(status)}">{_e(status)}</span></h1>'
        f'<p class="sub">{_e(" · ".join(m for m in meta if m))}</p>'
    )
    notes = list(run.get("notes") or [])
    if summary["counts"]["prompts"] == 0:
        notes.insert(0, "No prompts recorded in this run: there is nothing to measure yet.")
    elif summary["latency_s"] is None:
        notes.append("No successful prompts: latency not available.")
    if notes:
        out += '<div class="notes">' + "".join(f"<p>⚠ {_e(n)}</p>" for n in notes) + "</div>"
    return out


def _figure_html(name: str, ctx: _Ctx) -> str:
    return f"<figure>{_img(name, RUN_PLOTS[name](ctx), ALT[name])}</figure>"


def write_html(df: pd.DataFrame, summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report of one run to ``path`` and return it.

    Contents: headline numbers, Gantt timeline per worker (coloured by agent,
    failures red; large runs are thinned to at most :data:`MAX_TIMELINE_LANES`
    workers and :data:`MAX_TIMELINE_BARS` bars), requests in flight,
    throughput, latency histogram and CDF, per-agent / per-node / per-worker
    bars, allocation use, error breakdown, slowest prompts, cost, run.json and
    config.yaml (secrets masked), and the metric definitions.
    """
    ctx = _context(df, summary)
    fig = _figure_html
    sections = [
        _header(summary),
        _cards(summary),
        "<h2>Timeline</h2>",
        fig("timeline", ctx),
        f'<div class="grid2">{fig("inflight", ctx)}{fig("throughput", ctx)}</div>',
        "<h2>Latency and queue wait</h2>",
        f'<div class="grid2">{fig("latency_hist", ctx)}{fig("latency_cdf", ctx)}</div>',
        _latency_html(summary),
        "<h2>Agents and nodes</h2>",
        f'<div class="grid2">{fig("agents", ctx)}{fig("nodes", ctx)}</div>',
        _agents_html(summary),
        _nodes_html(summary),
        "<h2>Workers and allocation</h2>" if summary["allocation"] else "<h2>Workers</h2>",
        f'<div class="grid2">{fig("workers", ctx)}{fig("allocation", ctx) if summary["allocation"] else ""}</div>',
        _allocation_html(summary),
        _workers_html(summary),
        "",
    ]
    sections += [
        "<h2>Failures</h2>",
        f'<div class="grid2">{fig("errors", ctx)}<div>{_errors_html(summary)}</div></div>',
        "<h2>Slowest prompts</h2>",
        _slowest_html(summary),
        _cost_html(summary),
        _config_html(df),
        "<h2>Definitions</h2>",
        _definitions_html(),
        f"<footer>parsl-chat {_e(summary['run'].get('version') or '')} · report generated {now_utc()}</footer>",
    ]
    title = f"parsl-chat report {summary['run'].get('run_id') or ''}"
    return _write(Path(path), _page(title, "".join(sections)))


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot write the report ({exc.strerror or exc})", hint="pass --html PATH somewhere writable"
        ) from exc
    return path


# --------------------------------------------------------------------------- comparison HTML


def _plot_scaling(table: pd.DataFrame, column: str, ideal: str | None, title: str, ylabel: str) -> Figure:
    """``column`` against the scaled resource; ``ideal`` ``"linear"`` draws baseline x resources ratio, ``"one"`` 100%."""
    resource = str(table["resource"].iloc[0]) if len(table) else "resources"
    with _figure(6.2, 3.8) as (fig, (ax,)):
        data = table[["run_id", "resources", column]].dropna()
        if data.empty:
            return _placeholder(title, "not enough data (wall time or resources unknown)")
        order = data.sort_values("resources", kind="stable")
        x = order["resources"].to_numpy(dtype=float)
        y = order[column].to_numpy(dtype=float)
        ax.plot(x, y, marker="o", color="#1f77b4", linewidth=2, label="measured")
        for xi, yi, run_id in zip(x, y, order["run_id"], strict=True):
            ax.annotate(str(run_id), (xi, yi), textcoords="offset points", xytext=(5, 6), fontsize=8, color="#555555")
        top = float(y.max())
        first = table[["resources", column]].iloc[0]
        if ideal == "linear" and not first.isna().any():
            base_x, base_y = float(first["resources"]), float(first[column])
            xs = np.linspace(min(x.min(), base_x), x.max(), 50)
            ax.plot(xs, base_y * xs / base_x, color="#888888", linestyle="--", label="ideal (linear scaling)")
            top = max(top, base_y * float(x.max()) / base_x)
        elif ideal == "one":
            ax.axhline(1.0, color="#888888", linestyle="--", label="ideal (100%)")
            top = max(top, 1.0)
        ax.set_xlabel(resource.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top * 1.18)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.legend(loc="best", fontsize=8)
    return fig


def _plot_compare_cdf(table: pd.DataFrame, dfs: Sequence[pd.DataFrame]) -> Figure:
    title = "Latency CDF per run (successful requests)"
    with _figure(6.2, 3.8) as (fig, (ax,)):
        drawn = False
        for i, (run_id, df) in enumerate(zip(table["run_id"], dfs, strict=False)):
            values = _ok_latency(df)
            if values.size:
                _cdf(ax, values, str(run_id), PALETTE[i % len(PALETTE)], width=1.5)
                drawn = True
        if not drawn:
            return _placeholder(title, "no successful prompts in any run")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("fraction of requests ≤ latency")
        ax.legend(loc="lower right", fontsize=8)
    return fig


def write_comparison_html(table: pd.DataFrame, dfs: Sequence[pd.DataFrame], path: str | Path) -> Path:
    """Write the scaling comparison (table of :func:`compare` plus plots) to ``path``.

    Plots: speedup vs resources with the ideal linear line, efficiency vs
    resources with the 100% line, successful prompts/s vs resources, and the
    latency CDF of every run.
    """
    resource = str(table["resource"].iloc[0]) if len(table) else "resources"
    plots = [
        (
            "speedup",
            _plot_scaling(table, "speedup", "linear", "Speedup vs baseline", "speedup (×)"),
            "speedup against resources with the ideal line",
        ),
        (
            "efficiency",
            _plot_scaling(table, "efficiency", "one", "Scaling efficiency", "efficiency (speedup ÷ ideal speedup)"),
            "scaling efficiency against resources",
        ),
        (
            "throughput",
            _plot_scaling(table, "ok_per_s", "linear", "Throughput", "successful prompts/s"),
            "successful prompts per second against resources",
        ),
        ("latency_cdf", _plot_compare_cdf(table, dfs), "latency CDF of each run"),
    ]
    rows = [_comparison_cells(r) for r in table.to_dict("records")]
    headers = list(COMPARISON_HEADERS)
    base = str(table["run_id"].iloc[0]) if len(table) else DASH
    body = [
        f"<h1>parsl-chat scaling comparison: {len(table)} runs</h1>",
        f'<p class="sub">baseline {_e(base)} · resource scaled: {_e(resource.replace("_", " "))}</p>',
        _html_table(headers, rows, left=(0, 1)),
        _caption(
            f"speedup = ok/s ÷ baseline ok/s; ideal = {resource} ÷ baseline {resource}; scaling efficiency = speedup ÷ ideal; "
            "parallel efficiency = busy agent-seconds ÷ (agent slots × wall) within each run."
        ),
        '<div class="grid2">' + "".join(f"<figure>{_img(name, fig, alt)}</figure>" for name, fig, alt in plots) + "</div>",
        f"<footer>report generated {now_utc()}</footer>",
    ]
    return _write(Path(path), _page("parsl-chat scaling comparison", "".join(body)))


# --------------------------------------------------------------------------- CLI entry


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def report_runs(run_dirs: Sequence[Path], html: Path | None, as_json: bool, console: Console) -> int:
    """What ``parsl-chat report RUN_DIR... [--html PATH] [--json]`` does; returns the exit code (0).

    One run: the terminal tables (or ``summarize`` as JSON with ``as_json``)
    and the HTML report, by default ``<run_dir>/report.html``. Several runs:
    the scaling comparison table (JSON: ``{"comparison": [...], "runs":
    [summaries]}``) and its HTML, by default ``./report-compare.html``. The
    HTML path is printed (on stderr when printing JSON, so stdout stays JSON).
    Raises :class:`UsageError` for a path that is not a run directory.
    """
    if not run_dirs:
        raise UsageError("no run directory given", hint="usage: parsl-chat report RUN_DIR... [--html PATH] [--json]")
    dfs = [load_run(Path(d)) for d in run_dirs]
    note_console = Console(stderr=True) if as_json else console
    if len(dfs) == 1:
        df = dfs[0]
        summary = summarize(df)
        if as_json:
            console.out(json.dumps(summary, indent=2), highlight=False)
        else:
            render_terminal(summary, console)
        target = write_html(df, summary, html or Path(run_dirs[0]) / "report.html")
    else:
        table = compare(dfs)
        if as_json:
            payload = {"comparison": _jsonable(table.to_dict("records")), "runs": [summarize(df) for df in dfs]}
            console.out(json.dumps(payload, indent=2), highlight=False)
        else:
            render_comparison(table, console)
        target = write_comparison_html(table, dfs, html or Path.cwd() / "report-compare.html")
    note_console.print(f"HTML report: {target}", highlight=False, soft_wrap=True)
    return 0
