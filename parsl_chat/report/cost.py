"""The run's cost from ``run.json`` prices: service units per node-hour, or dollars per token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from .rows import ok_mask, place_labels, ran_rows
from .values import safe_ratio

__all__ = ["cost_summary"]


def cost_summary(
    df: pd.DataFrame,
    run: Mapping[str, Any],
    wall_s: float | None,
    allocation: Mapping[str, Any] | None,
    tokens: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Cost, when ``run.json`` ``cost`` gives prices.

    Service units: ``su`` = ``su_per_node_hour`` x node-hours, node-hours =
    allocated node-seconds / 3600 when there is an allocation, else wall_s /
    3600 x nodes seen in the rows (at least 1). Dollars: ``usd`` = prompt
    tokens / 1e6 x ``usd_per_1m_prompt_tokens`` + completion tokens / 1e6 x
    ``usd_per_1m_completion_tokens``. Both also per 1M total tokens and per
    1000 successful prompts.
    """
    prices = run.get("cost")
    if not isinstance(prices, dict):
        return None
    if prices.get("su_per_node_hour") is not None:
        return _su_cost(df, float(prices["su_per_node_hour"]), wall_s, allocation, tokens)
    if prices.get("usd_per_1m_prompt_tokens") is not None or prices.get("usd_per_1m_completion_tokens") is not None:
        return _usd_cost(df, prices, tokens)
    return None


def _su_cost(
    df: pd.DataFrame, rate: float, wall_s: float | None, allocation: Mapping[str, Any] | None, tokens: Mapping[str, Any]
) -> dict[str, Any]:
    """Service units: ``rate`` per node-hour, over the allocation or else the wall clock x nodes seen."""
    if allocation and allocation["node_s_allocated"] > 0:
        node_hours, basis = allocation["node_s_allocated"] / 3600.0, "allocated node-hours"
    else:
        nodes = max(1, int(place_labels(ran_rows(df)).nunique()))
        node_hours = (wall_s or 0.0) / 3600.0 * nodes
        basis = f"wall hours x {nodes} node(s) seen"
    su = rate * node_hours
    return {
        "unit": "SU",
        "su_per_node_hour": rate,
        "node_hours": node_hours,
        "basis": basis,
        "su": su,
        "su_per_1m_tokens": safe_ratio(su * 1e6, float(tokens["total"])),
        "su_per_1k_ok_prompts": safe_ratio(su * 1e3, float(ok_mask(df).sum())),
    }


def _usd_cost(df: pd.DataFrame, prices: Mapping[str, Any], tokens: Mapping[str, Any]) -> dict[str, Any]:
    """Dollars from the prices per million prompt and completion tokens."""
    p_rate = float(prices.get("usd_per_1m_prompt_tokens") or 0.0)
    c_rate = float(prices.get("usd_per_1m_completion_tokens") or 0.0)
    usd = tokens["prompt"] / 1e6 * p_rate + tokens["completion"] / 1e6 * c_rate
    return {
        "unit": "USD",
        "usd_per_1m_prompt_tokens": p_rate,
        "usd_per_1m_completion_tokens": c_rate,
        "basis": "token prices",
        "usd": usd,
        "usd_per_1m_tokens": safe_ratio(usd * 1e6, float(tokens["total"])),
        "usd_per_1k_ok_prompts": safe_ratio(usd * 1e3, float(ok_mask(df).sum())),
    }
