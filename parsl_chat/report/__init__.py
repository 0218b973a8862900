"""Efficiency reports of run directories: load, summarize, compare, and show (terminal tables, HTML).

The numbers all come from :func:`summarize` (the function that writes ``summary.json``);
the terminal and HTML reports only present them. One module per role:

    load        a run directory as one frame (load_run, normalize)
    compact     the low-memory read behind summarize_run
    summary     summarize, summarize_run, write_summary, with the sections of
                groups, allocation, cost, outcomes (and helpers values, intervals, rows)
    scaling     compare: the scaling table of several runs
    terminal    rich tables
    figures, timeline, plots     matplotlib figures
    html_page, html_run, html_compare, redaction     the self-contained HTML files
    command     report_runs: what ``parsl-chat report`` does

A name with a leading underscore is private to this package, shared by its modules.
``parsl_chat.analysis`` stays the stable entry point for ``load_run``, ``summarize``
and ``compare``. The presenting half (rich, matplotlib) is imported on first use: the
pipeline writes ``summary.json`` through this package and must not pay for matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .intervals import busy_union_s, seconds_since
from .load import RESULT_COLUMNS, load_run, normalize
from .scaling import compare
from .summary import Summary, summarize, summarize_run, wall_clock, write_summary

if TYPE_CHECKING:
    from .command import report_runs
    from .html_compare import write_comparison_html
    from .html_run import write_html
    from .plots import PLOT_NAMES
    from .terminal import render_comparison, render_terminal
    from .timeline import MAX_TIMELINE_BARS, MAX_TIMELINE_LANES, timeline_segments

__all__ = [
    "MAX_TIMELINE_BARS",
    "MAX_TIMELINE_LANES",
    "PLOT_NAMES",
    "RESULT_COLUMNS",
    "Summary",
    "busy_union_s",
    "compare",
    "load_run",
    "normalize",
    "render_comparison",
    "render_terminal",
    "report_runs",
    "seconds_since",
    "summarize",
    "summarize_run",
    "timeline_segments",
    "wall_clock",
    "write_comparison_html",
    "write_html",
    "write_summary",
]

#: names served on first use, and the module of each
_LAZY = {
    "MAX_TIMELINE_BARS": "timeline",
    "MAX_TIMELINE_LANES": "timeline",
    "PLOT_NAMES": "plots",
    "render_comparison": "terminal",
    "render_terminal": "terminal",
    "report_runs": "command",
    "timeline_segments": "timeline",
    "write_comparison_html": "html_compare",
    "write_html": "html_run",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
