"""What went wrong or slow: failures by type, structured-output validity, the slowest prompts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .rows import label_codes, ok_mask, place_labels

__all__ = ["SLOWEST_N", "VALID_STRUCTURED", "error_table", "slowest_candidates", "slowest_prompts", "structured_table"]


#: rows in the summary's ``slowest`` list
SLOWEST_N = 5


def error_table(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Failed rows per ``error_type`` (most frequent first) with the first error message as an example."""
    failed = df.loc[~ok_mask(df)]
    if failed.empty:
        return []
    kinds = label_codes(failed["error_type"], "other")
    counts = sorted(((k, v) for k, v in kinds.value_counts().items() if v), key=lambda kv: (-int(kv[1]), str(kv[0])))
    out = []
    for kind, count in counts:
        messages = failed.loc[kinds == kind, "error"].dropna()
        example = str(messages.iloc[0]) if len(messages) else None
        out.append({"error_type": str(kind), "count": int(count), "example": example[:300] if example else None})
    return out


#: :func:`_read_compact`'s stand-in for the ``parsed`` column: whether it holds an answer
VALID_STRUCTURED = "_parsed_valid"


def structured_table(df: pd.DataFrame) -> list[dict[str, Any]] | None:
    """Structured answers per agent and model: valid, ``invalid_output``, and the invalid-output rate.

    A row counts when it held a schema's answer (``parsed`` set) or ended as
    ``invalid_output``; agents without a schema do not appear. ``None`` for a run without any.
    """
    if VALID_STRUCTURED in df.columns:
        valid = df[VALID_STRUCTURED].to_numpy(dtype=bool)
    elif "parsed" in df.columns:
        valid = df["parsed"].notna().to_numpy()
    else:
        valid = np.zeros(len(df), dtype=bool)
    invalid = (df["error_type"] == "invalid_output").fillna(False).to_numpy(dtype=bool)
    if not (valid.any() or invalid.any()):
        return None
    frame = pd.DataFrame(
        {
            "agent": label_codes(df["agent"], "unknown"),
            "model": label_codes(df["model"], "unknown"),
            "valid": valid,
            "invalid": invalid,
        }
    )
    sums = frame.groupby(["agent", "model"], observed=True)[["valid", "invalid"]].sum().reset_index()
    out = []
    for agent, model, ok, bad in zip(sums["agent"], sums["model"], sums["valid"], sums["invalid"], strict=True):
        if ok + bad:
            out.append(
                {
                    "agent": str(agent),
                    "model": str(model),
                    "answers": int(ok + bad),
                    "valid": int(ok),
                    "invalid_output": int(bad),
                    "invalid_output_rate": int(bad) / int(ok + bad),
                }
            )
    return sorted(out, key=lambda r: (r["agent"], r["model"]))


def slowest_candidates(latency: pd.Series, n: int = SLOWEST_N) -> pd.Series:
    """Rows that can be among the ``n`` slowest: latency at least the n-th largest (ties all kept)."""
    if latency.notna().sum() <= n:
        return latency.notna()
    values = latency.to_numpy(dtype=float, na_value=np.nan)
    # the n largest of each block, then of those: no sorted copy of a million latencies
    tops = [np.sort(block[~np.isnan(block)])[-n:] for block in np.array_split(values, max(1, len(values) // 65536))]
    return latency >= np.sort(np.concatenate(tops))[-n]


def slowest_prompts(df: pd.DataFrame, n: int = SLOWEST_N) -> list[dict[str, Any]]:
    """The ``n`` rows with the largest ``latency_s`` (ok or failed; ties by ``custom_id``)."""
    rows = df.loc[slowest_candidates(df["latency_s"], n), ["custom_id", "agent", "status", "latency_s", "attempts"]].copy()
    rows["custom_id"] = rows["custom_id"].astype("str")  # ties sort by the id's text, not a category's position
    rows["node"] = place_labels(df.loc[rows.index]).astype("str")
    rows = rows.sort_values(["latency_s", "custom_id"], ascending=[False, True], kind="stable").head(n)
    out = []
    for record in rows.to_dict("records"):
        agent, attempts = record["agent"], record["attempts"]
        out.append(
            {
                "custom_id": str(record["custom_id"]),
                "agent": agent if isinstance(agent, str) else None,
                "node": str(record["node"]),
                "status": str(record["status"]),
                "latency_s": float(record["latency_s"]),
                "attempts": None if attempts is None or pd.isna(attempts) else int(attempts),
            }
        )
    return out
