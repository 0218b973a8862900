"""The compact read of ``results.parquet`` behind :func:`~.summary.summarize_run`: a million rows in little memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .load import RESULT_COLUMNS, SUMMARY_COLUMNS, is_normal, normalize
from .outcomes import VALID_STRUCTURED, slowest_candidates
from .rows import label_codes

__all__ = ["read_compact"]


#: unique strings per row: :func:`summarize_run` reads them only where summarize shows them
_SPARSE_COLUMNS = ("custom_id", "error")


#: columns with few distinct values: :func:`summarize_run` holds them as categories (a byte or two per row)
_LABEL_COLUMNS = ("agent", "model", "hostname", "node", "worker", "block", "job_id", "status", "error_type")


def read_compact(parquet: Path) -> pd.DataFrame:
    """The :data:`SUMMARY_COLUMNS` of ``parquet``; :data:`_LABEL_COLUMNS` as categories.

    One column at a time (Parquet is columnar), so Arrow's buffers for a
    column are freed before the next is read instead of pinning its pool.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = set(pq.read_schema(parquet).names)
    labels = [c for c in _LABEL_COLUMNS if c in names]
    file = pq.ParquetFile(parquet, read_dictionary=labels)
    # pandas' own types directly: nullable integers and "str" strings, no object detour
    mapping = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.string(): pd.StringDtype("pyarrow", na_value=np.nan),
        pa.bool_(): pd.BooleanDtype(),
    }.get
    rows = pd.RangeIndex(file.metadata.num_rows)
    df = pd.DataFrame(index=rows)  # filled column by column: no consolidating copy of the whole frame
    for name in SUMMARY_COLUMNS:
        if name in _SPARSE_COLUMNS:
            nothing = pd.CategoricalDtype(pd.Index([], dtype="str"))
            df[name] = pd.Categorical.from_codes(np.full(len(rows), -1, dtype=np.int8), dtype=nothing)
        elif name not in names:  # a file from an older version: the column is all missing
            df[name] = pd.Series(index=rows, dtype=RESULT_COLUMNS[name])
        else:
            # one thread, and the column's Arrow memory handed back before the next: no pool growth
            column = _narrowed(file.read(columns=[name], use_threads=False).column(0))
            df[name] = column.to_pandas(types_mapper=None if name in labels else mapping)
            del column
            pa.default_memory_pool().release_unused()
    # Unique strings, a million of them: read only the rows summarize shows (the slowest, one error per type).
    if "custom_id" in names:
        _fill_rows(df, file, "custom_id", np.flatnonzero(slowest_candidates(df["latency_s"]).to_numpy()))
    if "error" in names:
        _fill_first_errors(df, file)
    if "parsed" in names:  # which rows hold a valid structured answer: a byte per row, not the JSON text
        df[VALID_STRUCTURED] = _valid_mask(file, "parsed")
    if not is_normal(df, SUMMARY_COLUMNS):  # e.g. a column written with another type: the general path
        df = normalize(df)
    return df


def _valid_mask(file: Any, name: str) -> np.ndarray:
    """Where column ``name`` of a Parquet file is not null, read a row group at a time."""
    masks = [
        file.read_row_group(i, columns=[name], use_threads=False).column(0).is_valid().to_numpy(zero_copy_only=False)
        for i in range(file.metadata.num_row_groups)
    ]
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _narrowed(column: Any) -> Any:
    """An int64 Arrow column in the narrowest of :data:`_NARROW_INTS` that holds its values (else as it is)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.type != pa.int64() or column.null_count == len(column):
        return column
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    for kind in (pa.int8(), pa.int16(), pa.int32()):
        info = np.iinfo(kind.to_pandas_dtype())
        if info.min <= low and high <= info.max:
            return column.cast(kind)
    return column


def _row_groups(file: Any) -> list[tuple[int, int]]:
    """``(first row, row count)`` of each row group of a Parquet file."""
    groups, first = [], 0
    for i in range(file.metadata.num_row_groups):
        count = file.metadata.row_group(i).num_rows
        groups.append((first, count))
        first += count
    return groups


def _fill_rows(df: pd.DataFrame, file: Any, name: str, positions: np.ndarray) -> None:
    """Set ``df[name]`` at ``positions`` (sorted) from the file, reading only the row groups that hold them."""
    values: list[Any] = []
    for i, (first, count) in enumerate(_row_groups(file)):
        lo, hi = np.searchsorted(positions, [first, first + count])
        if hi > lo:
            column = file.read_row_group(i, columns=[name], use_threads=False).column(0)  # no thread pool: ~10 MB
            values += column.take(positions[lo:hi] - first).to_pylist()
    if len(positions):
        # held as categories: a byte per row plus the few strings read
        kinds = pd.CategoricalDtype(pd.Index(pd.unique(pd.Series(values, dtype="str").dropna())))
        codes = np.full(len(df), -1, dtype=np.int32)
        codes[positions] = pd.Categorical(values, dtype=kinds).codes
        df[name] = pd.Categorical.from_codes(codes, dtype=kinds)


def _fill_first_errors(df: pd.DataFrame, file: Any) -> None:
    """Set ``df["error"]`` on the first failed row with a message of each ``error_type`` (what :func:`_errors` shows)."""
    failed = (df["status"] != "ok").to_numpy()
    if not failed.any():
        return
    kinds = label_codes(df["error_type"], "other").cat.codes.to_numpy()
    seen: set[int] = set()
    positions: list[int] = []
    for i, (first, count) in enumerate(_row_groups(file)):
        if not failed[first : first + count].any():
            continue
        messages = file.read_row_group(i, columns=["error"], use_threads=False).column(0)
        has_message = messages.is_valid().to_numpy(zero_copy_only=False)
        for offset in np.flatnonzero(failed[first : first + count] & has_message):
            kind = int(kinds[first + offset])
            if kind not in seen:
                seen.add(kind)
                positions.append(first + int(offset))
    _fill_rows(df, file, "error", np.array(positions, dtype=np.int64))
