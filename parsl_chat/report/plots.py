"""The run report's plots by name (:data:`RUN_PLOTS`), and those not over time: latency, per group, allocation, failures."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .figures import FAIL, IDLE, OK, PlotContext, cdf, new_figure, ok_latency, placeholder, time_unit
from .format import fmt_pct, fmt_s, natural_key
from .timeline import plot_inflight, plot_throughput, plot_timeline

__all__ = ["ALT", "MAX_BAR_ROWS", "PLOT_NAMES", "RUN_PLOTS"]


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


#: groups drawn as bars, at most (the busiest)
MAX_BAR_ROWS = 40


def _plot_latency_hist(ctx: PlotContext) -> Figure:
    values = ok_latency(ctx.df)
    title = "Latency of successful requests"
    with new_figure(6.2, 3.6) as (fig, (ax,)):
        if values.size == 0:
            return placeholder(title, "no successful prompts: latency not available")
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


def _plot_latency_cdf(ctx: PlotContext) -> Figure:
    values = ok_latency(ctx.df)
    title = "Latency CDF (successful requests)"
    with new_figure(6.2, 3.6) as (fig, (ax,)):
        if values.size == 0:
            return placeholder(title, "no successful prompts: latency not available")
        cdf(ax, values, "all agents", "#222222", width=2.0)
        ok = ctx.df[ctx.df["status"] == "ok"]
        if 1 < len(ctx.colours) <= 8:
            for name, colour in ctx.colours.items():
                agent_values = ok.loc[ok["agent"] == name, "latency_s"].dropna().to_numpy(dtype=float)
                if agent_values.size:
                    cdf(ax, agent_values, name, colour, width=1.2)
        for q in (0.5, 0.95, 0.99):
            ax.axhline(q, color="#bbbbbb", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("fraction of requests ≤ latency")
        ax.legend(loc="lower right", fontsize=8)
    return fig


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
        return placeholder(title, "no prompts recorded")
    height = 1.5 + 0.3 * max(len(shown), 2)
    with new_figure(6.2, height, cols=2, sharey=True) as (fig, (ax, ax2)):
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
        unit_s, unit = time_unit(float(busy.max()) if busy.size else 0.0)
        ax2.barh(y, busy / unit_s, color=fill)
        for yi, (b, e) in enumerate(zip(busy, shown, strict=True)):
            if e.get(util_key) is not None:
                ax2.text(b / unit_s, yi, f" {fmt_pct(e[util_key])}", va="center", fontsize=8, color="#333333")
        ax2.set_xlim(0, max(float(busy.max()) / unit_s * 1.3, 1e-6))
        ax2.set_title(f"busy time ({util_label})", loc="left", fontweight="bold", fontsize=10)
        ax2.set_xlabel(f"busy time, sum of latencies ({unit})")
    return fig


def _plot_agents(ctx: PlotContext) -> Figure:
    return _plot_groups("Agents", ctx.summary["agents"], "agent", ctx.colours, "utilisation", "label: utilisation")


def _plot_nodes(ctx: PlotContext) -> Figure:
    return _plot_groups("Nodes", ctx.summary["nodes"], "node", None, "active_fraction", "label: time active")


def _plot_workers(ctx: PlotContext) -> Figure:
    workers = sorted(ctx.summary["workers"], key=lambda w: (natural_key(w["node"]), natural_key(w["worker"])))
    title = "Worker utilisation (busy time / (slots x wall time))"
    utils = np.array([w["utilisation"] if w["utilisation"] is not None else np.nan for w in workers], dtype=float)
    if not workers or not np.isfinite(utils).any():
        return placeholder(title, "no worker ran a request" if not workers else "wall time unknown")
    if len(workers) > MAX_BAR_ROWS:
        with new_figure(6.2, 3.6) as (fig, (ax,)):
            ax.hist(utils[np.isfinite(utils)] * 100, bins=20, color="#1f77b4", edgecolor="white")
            ax.set_title(f"{title}\n({len(workers)} workers)", loc="left", fontweight="bold")
            ax.set_xlabel("utilisation (%)")
            ax.set_ylabel("workers")
        return fig
    with new_figure(6.2, 1.4 + 0.28 * max(len(workers), 2)) as (fig, (ax,)):
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


def _plot_allocation(ctx: PlotContext) -> Figure:
    alloc = ctx.summary["allocation"] or {}
    per_node = list(alloc.get("per_node") or [])
    title = "Allocation use per node"
    if len(per_node) > MAX_BAR_ROWS:
        per_node = sorted(per_node, key=lambda n: -n["idle_s"])[:MAX_BAR_ROWS]
        title += f" (the {MAX_BAR_ROWS} idlest nodes)"
    with new_figure(6.2, 1.6 + 0.3 * max(len(per_node), 2)) as (fig, (ax,)):
        if not per_node:
            return placeholder(title, "no node in the allocation")
        names = [n["node"] for n in per_node]
        busy = np.array([n["busy_s"] for n in per_node], dtype=float)
        idle = np.array([n["idle_s"] for n in per_node], dtype=float)
        unit_s, unit = time_unit(float((busy + idle).max()))
        y = np.arange(len(names))
        ax.barh(y, busy / unit_s, color=OK, label="busy (requests in flight)")
        ax.barh(y, idle / unit_s, left=busy / unit_s, color=IDLE, label="idle")
        ax.set_yticks(y, names, fontsize=9 if len(names) <= 20 else 7)
        ax.invert_yaxis()
        ax.set_title(f"{title}: busy vs idle ({fmt_pct(alloc.get('busy_fraction'))} busy)", loc="left", fontweight="bold")
        ax.set_xlabel(f"allocated node time ({unit})")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _plot_errors(ctx: PlotContext) -> Figure:
    errors = ctx.summary["errors"]
    title = "Failed requests by error type"
    with new_figure(6.2, 1.5 + 0.32 * max(len(errors), 2)) as (fig, (ax,)):
        if not errors:
            return placeholder(title, "no failed requests" if ctx.summary["counts"]["prompts"] else "no prompts recorded")
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


#: how each plot of a run report is drawn, by ``data-plot`` name
RUN_PLOTS: dict[str, Callable[[PlotContext], Figure]] = {
    "timeline": plot_timeline,
    "inflight": plot_inflight,
    "throughput": plot_throughput,
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
