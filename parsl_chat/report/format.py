"""Numbers, durations and times for people, shared by the terminal and HTML reports."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pandas as pd

__all__ = [
    "COMPARISON_HEADERS",
    "DASH",
    "LATENCY_HEADERS",
    "MAX_TERMINAL_ROWS",
    "UNFINISHED_DETAIL",
    "cache_brief",
    "comparison_cells",
    "error_brief",
    "fmt_int",
    "fmt_num",
    "fmt_pct",
    "fmt_s",
    "latency_rows",
    "natural_key",
    "now_utc",
    "share_of",
    "short_list",
    "when_text",
]


#: what a missing value shows as
DASH = "—"

#: nodes and workers listed one by one before the tables show the busiest or least used only
MAX_TERMINAL_ROWS = 20


#: what an unfinished prompt is, where the terminal and HTML reports count them
UNFINISHED_DETAIL = "cut short by the stop, not failed: --resume sends them"


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


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def share_of(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def short_list(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit})" if len(items) > limit else "")


def _opt_float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _opt_int(value: Any) -> str:
    return DASH if value is None or pd.isna(value) else f"{int(value):,}"


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}x"


def error_brief(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts["errors_by_type"].items(), key=lambda kv: -kv[1]))


def cache_brief(cache: Mapping[str, Any]) -> str:
    """Misses, hit rate and what the hits saved (their tokens are not in 'tokens')."""
    saved = cache["tokens_saved"]
    return (
        f"{cache['misses']:,} misses ({fmt_pct(cache['hit_rate'])} hit rate); {saved['total']:,} tokens and "
        f"{fmt_s(cache['request_s_saved'])} of requests saved"
    )


def when_text(iso: str | None, *, clock: bool = False) -> str:
    """An ISO timestamp as ``2024-05-01 12:00:41 UTC`` (whole seconds), or ``12:00:41`` with ``clock``."""
    if not iso:
        return "?"
    return pd.Timestamp(iso).tz_convert("UTC").strftime("%H:%M:%S" if clock else "%Y-%m-%d %H:%M:%S UTC")


LATENCY_HEADERS = ("", "p50", "p95", "p99", "mean", "max", "n")


def latency_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The latency table's rows, for the terminal and the HTML report: ok latency, then queue wait (no p99 kept)."""
    latency, queue = summary["latency_s"], summary["queue_s"]
    rows = []
    if latency:
        rows.append(["latency (ok)", *(fmt_s(latency[k]) for k in ("p50", "p95", "p99", "mean", "max")), fmt_int(latency["n"])])
    if queue:
        p50, p95, mean, longest = (fmt_s(queue[k]) for k in ("p50", "p95", "mean", "max"))
        rows.append(["queue wait", p50, p95, DASH, mean, longest, fmt_int(queue["n"])])
    return rows


def now_utc() -> str:
    """The current time as ISO-8601 UTC (for report footers)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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


def comparison_cells(
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
