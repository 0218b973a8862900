"""The plots over the run's time: the Gantt timeline per worker, requests in flight, throughput."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import FAIL, OK, PALETTE, PlotContext, new_figure, placeholder, time_end
from .format import fmt_s, natural_key
from .intervals import seconds_since

__all__ = [
    "MAX_TIMELINE_BARS",
    "MAX_TIMELINE_LANES",
    "NICE_BINS_S",
    "bin_width_s",
    "inflight_series",
    "plot_inflight",
    "plot_throughput",
    "plot_timeline",
    "timeline_segments",
]


#: workers drawn in the timeline, at most (an evenly spaced subset beyond)
MAX_TIMELINE_LANES = 48
#: bars drawn in the timeline, at most (adjacent requests merged beyond)
MAX_TIMELINE_BARS = 4000


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
    all_lanes = sorted(set(lane_of), key=natural_key)
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


def plot_timeline(ctx: PlotContext) -> Figure:
    title = "Timeline: every request per worker, coloured by agent"
    if ctx.t0 is None or not ctx.df["started_at"].notna().any():
        return placeholder(title, "no request started", width=11.5)
    segments, lanes, total = timeline_segments(ctx.df, ctx.t0)
    height = 1.6 + 0.26 * max(len(lanes), 3)
    with new_figure(11.5, height) as (fig, (ax,)):
        ypos = {lane: i for i, lane in enumerate(lanes)}
        for (agent, failed), group in segments.groupby(["agent", "failed"], sort=True):
            bars = [(s / ctx.unit_s, max((e - s) / ctx.unit_s, 1e-9)) for s, e in zip(group["start"], group["end"], strict=True)]
            colour = FAIL if failed else ctx.colours.get(str(agent), PALETTE[-1])
            for lane, lane_bars in _by_lane(group["lane"].tolist(), bars).items():
                ax.broken_barh(lane_bars, (ypos[lane] - 0.38, 0.76), facecolors=colour, edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8 if len(lanes) > 24 else 9)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.set_xlim(0, time_end(ctx))
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


def _agent_handles(ctx: PlotContext, agents: set[str], *, with_failed: bool) -> list[Any]:
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=c, label=name) for name, c in ctx.colours.items() if name in agents]
    handles += [Patch(color=PALETTE[-1], label=name) for name in sorted(agents - set(ctx.colours))]
    if with_failed:
        handles.append(Patch(color=FAIL, label="failed"))
    return handles


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


def plot_inflight(ctx: PlotContext) -> Figure:
    title = "Requests in flight"
    with new_figure(6.2, 4.4) as (fig, (ax,)):
        times, counts = inflight_series(ctx.rel("started_at"), ctx.rel("finished_at"))
        if times.size == 0:
            return placeholder(title, "no request started")
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
        ax.set_xlim(0, time_end(ctx))
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


def plot_throughput(ctx: PlotContext) -> Figure:
    title = "Throughput"
    finished = ctx.rel("finished_at") * ctx.unit_s  # seconds
    ok = (ctx.df["status"] == "ok").to_numpy()
    has = np.isfinite(finished)
    with new_figure(6.2, 4.4, rows=2, sharex=True) as (fig, (ax, ax2)):
        if not has.any():
            return placeholder(title, "no request finished")
        span = time_end(ctx) * ctx.unit_s
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
