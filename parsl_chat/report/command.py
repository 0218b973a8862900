"""What ``parsl-chat report`` does."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from ..errors import UsageError
from .html_compare import write_comparison_html
from .html_run import write_html
from .load import load_run
from .scaling import compare
from .summary import summarize
from .terminal import render_comparison, render_terminal

__all__ = ["report_runs"]


def _jsonable(value: Any) -> Any:
    """``value`` with numpy numbers as Python's and NaN or NA as ``None``: the comparison table's records as JSON."""
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
