"""Time arithmetic on request intervals: seconds since an origin, and the union of intervals (time with a request in flight)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .rows import label_codes

__all__ = ["busy_union_s", "seconds_since", "union_by_group"]


#: ticks of a timestamp unit per second
_TICKS_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def seconds_since(series: pd.Series, origin: pd.Timestamp) -> np.ndarray:
    """Seconds from ``origin`` to each timestamp of ``series`` (NaN where missing)."""
    dtype = series.dtype
    unit = dtype.unit if isinstance(dtype, pd.DatetimeTZDtype) else None
    if unit is None or pd.Timestamp(origin).tzinfo is None:
        delta = series - origin
        return np.asarray(delta.dt.total_seconds().to_numpy(dtype=float, na_value=np.nan))
    # straight from the integer ticks, in place: one float array, no timedelta or float Series in between
    ticks = series.array.asi8
    per_second = _TICKS_PER_SECOND[unit]
    out = ticks.astype(np.float64)  # exact: ticks of these units stay below 2**53 until the year 2255
    out -= pd.Timestamp(origin).as_unit(unit).value
    out /= per_second
    out[ticks == np.iinfo(np.int64).min] = np.nan
    return out


def busy_union_s(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of the intervals ``[starts[i], ends[i]]`` (seconds).

    Overlapping or touching intervals count once: this is the time during
    which at least one request was in flight. Intervals with a missing bound
    or ``end < start`` are ignored.
    """
    seg_start, seg_end = _merged(starts, ends)
    return float(np.sum(seg_end - seg_start))


def _merged(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of the intervals as disjoint segments ``(starts, ends)``, in order."""
    ok = ~(np.isnan(starts) | np.isnan(ends)) & (ends >= starts)
    if not ok.any():
        return np.zeros(0), np.zeros(0)
    order = np.argsort(starts[ok], kind="stable")
    return _merged_sorted(starts[ok][order], ends[ok][order])


def _merged_sorted(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_merged` of intervals already sorted by start; ``ends`` is overwritten (no copy of a million rows)."""
    reach = np.maximum.accumulate(ends, out=ends)  # the latest end so far
    # a new merged segment begins where an interval starts after everything before it ended
    new = np.empty(starts.size, dtype=bool)
    new[0] = True
    np.greater(starts[1:], reach[:-1], out=new[1:])
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, starts.size - 1)  # a segment ends with the reach of its last interval
    return starts[first], reach[last]


def union_by_group(keys: pd.Series, started: pd.Series, finished: pd.Series) -> dict[str, float]:
    """:func:`busy_union_s` of the ``started`` -> ``finished`` intervals for every group of ``keys`` at once.

    One sort by group, then start, on the timestamps' integer ticks (views, no
    conversion); then each group's run of intervals is merged in place. A million
    rows cost three arrays of a number per row.
    """
    labels = label_codes(keys, "unknown")
    starts, per_second = _ticks(started)
    ends, _ = _ticks(finished, like=started)
    missing = np.iinfo(np.int64).min  # NaT
    known = (starts != missing) & (ends != missing) & (ends >= starts)
    order = np.lexsort((starts, labels.cat.codes.to_numpy()))
    if not known.all():
        order = order[known[order]]
    del known
    codes = labels.cat.codes.to_numpy()[order]
    starts, ends = starts[order], ends[order]
    del order
    bounds = np.searchsorted(codes, np.arange(len(labels.cat.categories) + 1))
    union = {}
    for i, name in enumerate(labels.cat.categories):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if hi > lo:
            seg_start, seg_end = _merged_sorted(starts[lo:hi], ends[lo:hi])
            union[str(name)] = float(np.sum(seg_end - seg_start)) / per_second
    return union


def _ticks(series: pd.Series, like: pd.Series | None = None) -> tuple[np.ndarray, float]:
    """The integer ticks of a timestamp column (a view where it can be) and ticks per second.

    With ``like``, in the same unit as that column.
    """
    if not pd.api.types.is_datetime64_any_dtype(series.dtype):
        series = pd.to_datetime(series, utc=True)
    model = like if like is not None and pd.api.types.is_datetime64_any_dtype(like.dtype) else series
    unit = str(model.dt.unit)
    if str(series.dt.unit) != unit:
        series = series.dt.as_unit(unit)
    return series.array.asi8, _TICKS_PER_SECOND[unit]
