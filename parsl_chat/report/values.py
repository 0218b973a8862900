"""JSON-safe numbers and UTC times for the summary (``None`` for anything missing or not finite)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["as_number", "iso_text", "parse_time", "percentiles_of", "safe_ratio"]


def as_number(value: Any) -> float | None:
    """A JSON-safe float: ``None`` for missing, NaN or infinite values."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def iso_text(stamp: Any) -> str | None:
    if stamp is None or pd.isna(stamp):
        return None
    return pd.Timestamp(stamp).tz_convert("UTC").isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> pd.Timestamp | None:
    """An ISO-8601 string (or datetime) from run.json as a UTC timestamp; ``None`` if absent or bad."""
    if value is None or value == "":
        return None
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        return None
    if pd.isna(stamp):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def percentiles_of(values: np.ndarray, qs: Mapping[str, float]) -> dict[str, float | None]:
    if values.size == 0:
        return {name: None for name in qs}
    return {name: as_number(np.percentile(values, q)) for name, q in qs.items()}
