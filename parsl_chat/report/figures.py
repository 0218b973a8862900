"""What every matplotlib figure of the reports shares: the look, the colours, PNG encoding, the run's time axis."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .intervals import seconds_since

__all__ = [
    "DPI",
    "FAIL",
    "IDLE",
    "OK",
    "PALETTE",
    "PlotContext",
    "cdf",
    "img_html",
    "new_figure",
    "ok_latency",
    "placeholder",
    "plot_context",
    "time_end",
    "time_unit",
]


#: pixels per inch of every PNG: the figure sizes below are in inches
DPI = 110

# Agent colours: tab10 without its red, which marks failures everywhere.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FAIL = "#d62728"
OK = "#2a9d8f"
IDLE = "#d9d9d9"


@dataclass
class PlotContext:
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


def time_unit(span_s: float) -> tuple[float, str]:
    if span_s <= 600:
        return 1.0, "s"
    if span_s <= 4 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def plot_context(df: pd.DataFrame, summary: Mapping[str, Any]) -> PlotContext:
    start = summary["wall"]["start"]
    t0 = pd.Timestamp(start) if start else None
    if t0 is None and df["started_at"].notna().any():
        t0 = pd.Timestamp(df["started_at"].min())
    span = summary["wall_s"] or 0.0
    if t0 is not None and df["finished_at"].notna().any():
        span = max(span, (pd.Timestamp(df["finished_at"].max()) - t0).total_seconds())
    unit_s, unit = time_unit(span)
    names = [a["agent"] for a in summary["agents"]]
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    return PlotContext(df=df, summary=summary, t0=t0, unit_s=unit_s, unit=unit, colours=colours)


def time_end(ctx: PlotContext) -> float:
    wall = ctx.summary["wall_s"] or 0.0
    finished = ctx.rel("finished_at")
    last = float(np.nanmax(finished)) if np.isfinite(finished).any() else 0.0
    return max(wall / ctx.unit_s, last, 1e-6)


@contextmanager
def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any) -> Iterator[tuple[Figure, list[Axes]]]:
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


def placeholder(title: str, message: str, width: float = 6.2) -> Figure:
    """A short titled figure saying why there is nothing to plot (keeps every ``data-plot`` present)."""
    with new_figure(width, 1.4) as (fig, (ax,)):
        ax.set_title(title, loc="left", fontweight="bold")
        ax.text(0.5, 0.4, message, ha="center", va="center", fontsize=12, color="#666666", transform=ax.transAxes)
        ax.set_axis_off()
    return fig


def img_html(name: str, fig: Figure, alt: str) -> str:
    data, width, height = _png(fig)
    return (
        f'<img data-plot="{name}" alt="{html.escape(alt)}" width="{width}" height="{height}" src="data:image/png;base64,{data}">'
    )


def cdf(ax: Axes, values: np.ndarray, label: str, colour: str, *, width: float, points: int = 2000) -> None:
    """Empirical CDF; above ``points`` values it is drawn through ``points`` evenly spaced quantiles."""
    if values.size > points:
        y = np.linspace(0.0, 1.0, points)
        x = np.quantile(values, y)
        ax.plot(x, y, color=colour, linewidth=width, label=label)
        return
    x = np.sort(values)
    y = np.arange(1, x.size + 1) / x.size
    ax.step(np.concatenate([[x[0]], x]), np.concatenate([[0.0], y]), where="post", color=colour, linewidth=width, label=label)


def ok_latency(df: pd.DataFrame) -> np.ndarray:
    return df.loc[df["status"] == "ok", "latency_s"].dropna().to_numpy(dtype=float)
