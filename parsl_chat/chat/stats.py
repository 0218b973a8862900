"""Request statistics of a chat session, for /stats and the /batch summary."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from ..core.agents import AgentSpec
from ..report.intervals import busy_union_s

__all__ = ["RequestStat", "fmt_pct", "fmt_s", "percentiles", "row_stat", "summarize_requests"]


@dataclass
class RequestStat:
    """One request of this session (a chat turn or a /batch row), for /stats."""

    kind: str  # chat | batch
    agent: str
    status: str  # ok | error
    started: float
    finished: float
    completion_tokens: int = 0
    error_type: str | None = None
    ttft_s: float | None = None  # time to the first token (streamed chat only)

    @property
    def latency_s(self) -> float:
        return max(0.0, self.finished - self.started)


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return float(p50), float(p95)


def summarize_requests(requests: list[RequestStat], agents: list[AgentSpec], wall_s: float) -> dict[str, Any]:
    """The figures /stats and /batch print (plain numbers; wall_s is the period they cover)."""
    ok = [r for r in requests if r.status == "ok"]
    errors: dict[str, int] = {}
    for r in requests:
        if r.status != "ok":
            errors[r.error_type or "other"] = errors.get(r.error_type or "other", 0) + 1
    p50, p95 = percentiles([r.latency_s for r in ok])
    t50, _ = percentiles([r.ttft_s for r in ok if r.ttft_s is not None])
    tokens = sum(r.completion_tokens for r in ok)
    busy_wall = busy_union_s(np.array([r.started for r in requests]), np.array([r.finished for r in requests]))
    slots = sum(a.concurrency for a in agents)
    busy_agent_s = sum(r.latency_s for r in requests)
    wall = max(wall_s, 1e-9)
    per_agent = {}
    for a in agents:
        mine = [r for r in requests if r.agent == a.name]
        busy = sum(r.latency_s for r in mine)
        per_agent[a.name] = {
            "requests": len(mine),
            "errors": sum(1 for r in mine if r.status != "ok"),
            "busy_s": busy,
            "utilisation": busy / (a.concurrency * wall),
        }
    return {
        "requests": len(requests),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_type": errors,
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "first_token_p50_s": t50,
        "completion_tokens": tokens,
        "busy_wall_s": busy_wall,
        "tokens_per_s": tokens / busy_wall if busy_wall > 0 else None,
        "requests_per_s": len(ok) / wall,
        "wall_s": wall_s,
        "agent_slots": slots,
        "busy_agent_s": busy_agent_s,
        "parallel_efficiency": busy_agent_s / (slots * wall) if slots else None,
        "agents": per_agent,
    }


def fmt_s(value: float | None, unit: str = " s", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ts(value: Any) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value)).timestamp()


def row_stat(row: Mapping[str, Any]) -> RequestStat:
    started = _ts(row.get("started_at"))
    finished = _ts(row.get("finished_at"))
    if started is None:
        started = finished = finished or _ts(row.get("submitted_at")) or time.time()
    return RequestStat(
        kind="batch",
        agent=str(row.get("agent") or "?"),
        status=str(row.get("status") or "error"),
        started=started,
        finished=finished if finished is not None else started,
        completion_tokens=int(row.get("completion_tokens") or 0),
        error_type=row.get("error_type"),
    )
