"""The stable public entry point for analysing run directories from Python.

    from parsl_chat.analysis import load_run, summarize, compare

:func:`load_run` reads a run directory into one :class:`pandas.DataFrame` (one row per
prompt, the columns of docs/interfaces.md), :func:`summarize` turns it into the metrics
of ``summary.json`` and :func:`compare` builds the scaling table of several runs. The
code lives in :mod:`parsl_chat.report` (one module per role); these names stay here.
"""

from __future__ import annotations

from .core.agents import ERROR_TYPES
from .report import (
    RESULT_COLUMNS,
    busy_union_s,
    compare,
    load_run,
    normalize,
    seconds_since,
    summarize,
    summarize_run,
    wall_clock,
    write_summary,
)

__all__ = [
    "ERROR_TYPES",
    "RESULT_COLUMNS",
    "busy_union_s",
    "compare",
    "load_run",
    "normalize",
    "seconds_since",
    "summarize",
    "summarize_run",
    "wall_clock",
    "write_summary",
]
