"""The self-contained HTML scaling comparison of several runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import PALETTE, cdf, img_html, new_figure, ok_latency, placeholder
from .format import COMPARISON_HEADERS, DASH, comparison_cells, now_utc
from .html_page import caption_html, escape, html_table, page_html, write_page

__all__ = ["COMPARISON_PLOT_NAMES", "write_comparison_html"]


#: ``data-plot`` names of a comparison report, in page order
COMPARISON_PLOT_NAMES = ("speedup", "efficiency", "throughput", "latency_cdf")


def _plot_scaling(table: pd.DataFrame, column: str, ideal: str | None, title: str, ylabel: str) -> Figure:
    """``column`` against the scaled resource; ``ideal`` ``"linear"`` draws baseline x resources ratio, ``"one"`` 100%."""
    resource = str(table["resource"].iloc[0]) if len(table) else "resources"
    with new_figure(6.2, 3.8) as (fig, (ax,)):
        data = table[["run_id", "resources", column]].dropna()
        if data.empty:
            return placeholder(title, "not enough data (wall time or resources unknown)")
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
    with new_figure(6.2, 3.8) as (fig, (ax,)):
        drawn = False
        for i, (run_id, df) in enumerate(zip(table["run_id"], dfs, strict=False)):
            values = ok_latency(df)
            if values.size:
                cdf(ax, values, str(run_id), PALETTE[i % len(PALETTE)], width=1.5)
                drawn = True
        if not drawn:
            return placeholder(title, "no successful prompts in any run")
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
    rows = [comparison_cells(r) for r in table.to_dict("records")]
    headers = list(COMPARISON_HEADERS)
    base = str(table["run_id"].iloc[0]) if len(table) else DASH
    body = [
        f"<h1>parsl-chat scaling comparison: {len(table)} runs</h1>",
        f'<p class="sub">baseline {escape(base)} · resource scaled: {escape(resource.replace("_", " "))}</p>',
        html_table(headers, rows, left=(0, 1)),
        caption_html(
            f"speedup = ok/s ÷ baseline ok/s; ideal = {resource} ÷ baseline {resource}; scaling efficiency = speedup ÷ ideal; "
            "parallel efficiency = busy agent-seconds ÷ (agent slots × wall) within each run."
        ),
        '<div class="grid2">' + "".join(f"<figure>{img_html(name, fig, alt)}</figure>" for name, fig, alt in plots) + "</div>",
        f"<footer>report generated {now_utc()}</footer>",
    ]
    return write_page(Path(path), page_html("parsl-chat scaling comparison", "".join(body)))
