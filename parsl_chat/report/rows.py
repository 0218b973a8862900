"""Row selections and grouping on category codes for the summary sections: a few numbers per row at a million rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "agent_slots",
    "cache_hits",
    "distinct_pairs",
    "group_records",
    "label_codes",
    "new_tokens",
    "ok_mask",
    "place_labels",
    "ran_rows",
    "run_meta",
]


def run_meta(df: pd.DataFrame) -> dict[str, Any]:
    run = df.attrs.get("run")
    return run if isinstance(run, dict) else {}


def _category(series: pd.Series) -> pd.Series:
    """``series`` as categories (as it is when it already is)."""
    return series if isinstance(series.dtype, pd.CategoricalDtype) else series.astype("category")


def label_codes(series: pd.Series, missing: str) -> pd.Series:
    """``series`` as categories with ``missing`` for missing values: grouping by it costs a code per row."""
    cat = _category(series)
    if cat.isna().any():
        if missing not in cat.cat.categories:
            cat = cat.cat.add_categories([missing])
        cat = cat.fillna(missing)
    return cat


def place_labels(df: pd.DataFrame) -> pd.Series:
    """Where each request ran: the scheduler node, else the hostname, else ``"unknown"`` (as categories)."""
    node = label_codes(df["node"], "unknown")
    if not df["node"].isna().any():
        return node
    host = _category(df["hostname"])
    both = node.cat.categories.union(host.cat.categories)
    node_codes = node.cat.set_categories(both).cat.codes.to_numpy()
    host_codes = host.cat.set_categories(both).cat.codes.to_numpy()
    unknown = list(both).index("unknown") if "unknown" in both else -1
    # the node, else the host, else "unknown" (the node's own fill value)
    missing_node = df["node"].isna().to_numpy()
    codes = np.where(missing_node & (host_codes >= 0), host_codes, np.where(missing_node, unknown, node_codes))
    return pd.Series(pd.Categorical.from_codes(codes, categories=both), index=df.index)


_PLACE_COLUMNS = ("node", "hostname", "worker", "status", "latency_s", "completion_tokens", "started_at", "finished_at", "cached")


def ran_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that reached a worker: they started, or name a node or host (not e.g. ``invalid_input`` rows).

    Only the columns the per-node and per-worker tables read, and no copy when every row ran.
    """
    ran = df["started_at"].notna() | df["node"].notna() | df["hostname"].notna()
    return df if ran.all() else df.loc[ran, list(_PLACE_COLUMNS)]


def ok_mask(df: pd.DataFrame) -> pd.Series:
    return df["status"] == "ok"


def cache_hits(df: pd.DataFrame) -> np.ndarray:
    """Rows answered from the response cache (no request sent), as a bool array."""
    if "cached" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    return df["cached"].to_numpy(dtype=bool, na_value=False)


def new_tokens(df: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` (a token count) per row, 0 for cache hits: tokens this run had an endpoint process."""
    return np.where(cache_hits(df), 0.0, df[column].to_numpy(dtype=float, na_value=0.0))


def agent_slots(run: Mapping[str, Any]) -> int | None:
    """``run.json`` ``agent_slots``, else the sum of the agents' ``concurrency``."""
    slots = run.get("agent_slots")
    if isinstance(slots, (int, float)) and slots > 0:
        return int(slots)
    agents = run.get("agents") or []
    total = sum(int(a.get("concurrency") or 0) for a in agents if isinstance(a, dict))
    return total or None


def group_records(df: pd.DataFrame, keys: Mapping[str, pd.Series]) -> list[dict[str, Any]]:
    """Per group of ``keys``: prompts, ok, error, busy_s (sum of latency_s), completion_tokens.

    Sorted by the keys' text. Counted with numpy on category codes: a few arrays of a number per row.
    """
    labels = [label_codes(series, "unknown") for series in keys.values()]
    categories = [label.cat.categories for label in labels]
    group, present, space = _combinations([label.cat.codes.to_numpy() for label in labels], categories)
    prompts = np.bincount(group, minlength=space)
    ok = np.bincount(group, weights=ok_mask(df).to_numpy(dtype=float), minlength=space)
    busy = np.bincount(group, weights=df["latency_s"].to_numpy(dtype=float, na_value=0.0), minlength=space)
    tokens = np.bincount(group, weights=new_tokens(df, "completion_tokens"), minlength=space)
    del group
    kept = np.flatnonzero(prompts)  # groups that have rows (all of them when numbered)
    combined = kept if present is None else present[kept]
    records = []
    for i, code in zip(kept.tolist(), combined.tolist(), strict=True):
        record: dict[str, Any] = dict(zip(keys, _names(code, categories), strict=True))
        record.update(
            prompts=int(prompts[i]),
            ok=int(ok[i]),
            busy_s=float(busy[i]),
            completion_tokens=int(tokens[i]),
            error=int(prompts[i] - ok[i]),
        )
        records.append(record)
    return sorted(records, key=lambda r: tuple(r[name] for name in keys))


def _combinations(codes: Sequence[np.ndarray], categories: Sequence[pd.Index]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Each row's combination of category codes as one number, ready for ``np.bincount``.

    Returns ``(group, present, space)``: ``np.bincount(group, minlength=space)`` counts the
    combinations. ``present`` is ``None`` when ``group`` is the combined code itself (no sort,
    no second array per row); where the combinations are sparse (many nodes x many workers)
    the ones present are numbered instead, ``group`` indexing ``present``. :func:`_names`
    turns a combined code back into names.
    """
    group = np.zeros(len(codes[0]), dtype=np.int64)
    space = 1
    for own, kinds in zip(codes, categories, strict=True):
        group *= len(kinds)
        group += own
        space *= len(kinds)
    if space > 2 * len(group) + 1024:
        present, group = np.unique(group, return_inverse=True)
        return group, present, len(present)
    return group, None, space


def _names(code: int, categories: Sequence[pd.Index]) -> list[str]:
    """The category names a code of :func:`_combinations` stands for."""
    names: list[str] = []
    for kinds in reversed(categories):
        code, own = divmod(code, len(kinds))
        names.append(str(kinds[own]))
    return names[::-1]


def distinct_pairs(first: pd.Series, second: pd.Series) -> list[tuple[str, str]]:
    """The distinct ``(first, second)`` pairs in the rows, skipping missing values.

    Counted on category codes (a number per row), not by pandas' groupby, which
    sorted copies of both columns: 40 MB at a million rows.
    """
    a, b = _category(first), _category(second)
    a_codes, b_codes = a.cat.codes.to_numpy(), b.cat.codes.to_numpy()
    both = (a_codes >= 0) & (b_codes >= 0)
    categories = [a.cat.categories, b.cat.categories]
    group, present, space = _combinations([a_codes[both], b_codes[both]], categories)
    kept = np.flatnonzero(np.bincount(group, minlength=space))
    combined = kept if present is None else present[kept]
    return [(x, y) for x, y in (_names(code, categories) for code in combined.tolist())]
