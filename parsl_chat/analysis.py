"""Efficiency analysis of a run directory: load the results, compute the metrics.

:func:`load_run` reads a run directory into one :class:`pandas.DataFrame`
(one row per prompt, the columns of the SPEC), :func:`summarize` turns it into
the JSON-serialisable metrics written to ``summary.json`` and shown by
``parsl-chat report``, and :func:`compare` builds the scaling table of several
runs. The pipeline writes ``summary.json`` with :func:`write_summary`, and the
report recomputes the same numbers with the same function, so the two never
disagree.

Definitions (every duration in seconds, every timestamp UTC):

wall clock
    ``run.json`` ``started_at`` -> ``finished_at`` when both are present (the
    driver's own wall clock: it includes start-up, block queueing and draining).
    A run without ``finished_at`` (still running, crashed) ends at the last
    ``finished_at`` of a row; a run without ``run.json`` times spans the first
    ``submitted_at`` to the last ``finished_at`` of the rows.
busy seconds
    Sum of ``latency_s`` over the rows that have one (successful *and* failed
    requests: a failing request holds its agent slot as long as it runs).
percentiles
    Linear interpolation between closest ranks (numpy's default method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._files import atomic_write
from .agents import ERROR_TYPES
from .errors import UsageError

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

#: The result columns of the SPEC, in order, with the dtype :func:`normalize` gives them.
RESULT_COLUMNS: dict[str, str] = {
    "custom_id": "str",
    "line": "Int64",
    "agent": "str",
    "model": "str",
    "endpoint": "str",
    "hostname": "str",
    "node": "str",
    "worker": "str",
    "block": "str",
    "job_id": "str",
    "conversation": "str",
    "turn": "Int64",
    "status": "str",
    "error_type": "str",
    "error": "str",
    "attempts": "Int64",
    "submitted_at": "datetime64[us, UTC]",
    "started_at": "datetime64[us, UTC]",
    "finished_at": "datetime64[us, UTC]",
    "queue_s": "float64",
    "latency_s": "float64",
    "prompt_tokens": "Int64",
    "completion_tokens": "Int64",
    "finish_reason": "str",
    "response": "str",
}


#: Run statuses whose results may be incomplete ("failed" is a finished run with too many failed prompts).
PARTIAL_STATUSES = ("running", "interrupted")
SLOWEST_N = 5
SUMMARY_SCHEMA = 1


# --------------------------------------------------------------------------- loading


#: what :func:`summarize` reads: every result column but the answers' text and a few it never looks at
SUMMARY_COLUMNS = tuple(
    c for c in RESULT_COLUMNS if c not in ("response", "endpoint", "finish_reason", "conversation", "turn", "line")
)
#: unique strings per row: :func:`summarize_run` reads them only where summarize shows them
_SPARSE_COLUMNS = ("custom_id", "error")
#: columns with few distinct values: :func:`summarize_run` holds them as categories (a byte or two per row)
_LABEL_COLUMNS = ("agent", "model", "hostname", "node", "worker", "block", "job_id", "status", "error_type")
#: nullable integer types :func:`summarize_run` holds counts in when they fit (attempts: a byte, not eight)
_NARROW_INTS = ("Int8", "Int16", "Int32")


def load_run(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a run directory into a frame with one row per prompt.

    Rows come from ``results.parquet``; a run that crashed or was interrupted
    before writing it is rebuilt from ``ledger.jsonl`` (a torn last line is
    skipped; when a ``custom_id`` appears more than once the last record wins),
    and failing both from ``results.csv``.
    ``df.attrs["run"]`` holds ``run.json`` (``{}`` when absent),
    ``df.attrs["run_dir"]`` the directory, ``df.attrs["source"]`` the file the
    rows came from (``"empty"`` when none) and ``df.attrs["notes"]`` a list of
    things the reader had to tolerate.

    Raises :class:`UsageError` when ``path`` is not a run directory.
    """
    run_dir = Path(path)
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such run directory", hint="pass a directory written by `parsl-chat run`")
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a run directory (it is a file)", hint="pass the directory that holds results.parquet")
    parquet, ledger, meta = run_dir / "results.parquet", run_dir / "ledger.jsonl", run_dir / "run.json"
    if not (parquet.exists() or ledger.exists() or meta.exists() or (run_dir / "results.csv").exists()):
        raise UsageError(
            f"{run_dir}: not a run directory: none of results.parquet, ledger.jsonl, results.csv or run.json is there",
            hint="pass a directory written by `parsl-chat run` (runs/<run-id>)",
        )
    notes: list[str] = []
    run = _read_run_json(meta, notes)
    df, source = _read_rows(parquet, ledger, notes, columns)
    df = normalize(df)
    df.attrs["run"] = run
    df.attrs["run_dir"] = str(run_dir)
    df.attrs["source"] = source
    df.attrs["notes"] = notes
    return df


def _read_run_json(meta: Path, notes: list[str]) -> dict[str, Any]:
    if not meta.exists():
        notes.append("run.json is missing: run metadata (agents, slots, blocks) unknown")
        return {}
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"run.json is unreadable ({exc}): run metadata ignored")
        return {}
    if not isinstance(data, dict):
        notes.append("run.json is not a JSON object: run metadata ignored")
        return {}
    return data


def _read_rows(parquet: Path, ledger: Path, notes: list[str], columns: Sequence[str] | None = None) -> tuple[pd.DataFrame, str]:
    if parquet.exists():
        try:
            if columns is not None:
                import pyarrow.parquet as pq

                present = set(pq.read_schema(parquet).names)
                return pd.read_parquet(parquet, columns=[c for c in columns if c in present]), "results.parquet"
            return pd.read_parquet(parquet), "results.parquet"
        except Exception as exc:  # pyarrow raises many types for a damaged file
            if not ledger.exists():
                raise UsageError(f"{parquet}: cannot read results ({exc})") from exc
            notes.append(f"results.parquet is unreadable ({exc}): rows rebuilt from ledger.jsonl")
    if ledger.exists():
        notes.append("results.parquet is missing: rows rebuilt from ledger.jsonl")
        return _read_ledger(ledger, notes), "ledger.jsonl"
    csv = parquet.with_name("results.csv")
    if csv.exists():
        notes.append("results.parquet and ledger.jsonl are missing: rows read from results.csv")
        return pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""]), "results.csv"
    return pd.DataFrame(), "empty"


LEDGER_CHUNK = 50_000


def _read_ledger(ledger: Path, notes: list[str]) -> pd.DataFrame:
    """Rows of ``ledger.jsonl``: the last record of a ``custom_id`` wins, in line order.

    Lines that are not JSON (a torn last line after a crash) are skipped and
    noted; JSON lines that are not result records (no ``custom_id``) are
    ignored. Parsed in chunks so a million-line ledger never holds a million
    dicts at once.
    """
    chunks: list[pd.DataFrame] = []
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    with ledger.open("r", encoding="utf-8", errors="replace") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                bad.append(number)
                continue
            if isinstance(record, dict) and record.get("custom_id") is not None:
                records.append(record)
            if len(records) >= LEDGER_CHUNK:
                chunks.append(pd.DataFrame.from_records(records))
                records = []
    if records:
        chunks.append(pd.DataFrame.from_records(records))
    if bad:
        where = ", ".join(str(n) for n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        notes.append(f"ledger.jsonl: {len(bad)} unreadable line(s) skipped (line {where})")
    if not chunks:
        return pd.DataFrame()
    df = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
    df["custom_id"] = df["custom_id"].astype("str")
    df = df.drop_duplicates(subset="custom_id", keep="last")
    if "line" in df.columns:
        df = df.iloc[np.argsort(pd.to_numeric(df["line"], errors="coerce").to_numpy(dtype=float), kind="stable")]
    return df.reset_index(drop=True)


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with every SPEC column present, in order, with its dtype.

    Strings become pandas strings (missing values stay missing), integers
    nullable ``Int64``, timestamps ``datetime64[us, UTC]`` (ISO strings are
    parsed), durations ``float64``. Extra columns are kept after the SPEC ones.
    ``attrs`` are preserved.
    """
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for column, dtype in RESULT_COLUMNS.items():
        if column in df.columns:
            out[column] = _coerce(df[column].reset_index(drop=True), dtype)
        else:  # all missing, made in its own dtype (no million-None detour)
            out[column] = pd.Series(index=out.index, dtype=dtype)
    for column in df.columns:
        if column not in RESULT_COLUMNS:
            out[column] = df[column].reset_index(drop=True)
    out.attrs.update(df.attrs)
    return out


def _is_normal(df: pd.DataFrame, columns: Iterable[str]) -> bool:
    """Whether ``df`` has ``columns`` with :func:`normalize`'s dtypes (strings may be categories)."""
    for column in columns:
        dtype = RESULT_COLUMNS[column]
        if column not in df.columns:
            return False
        actual = df[column].dtype
        if str(actual) == dtype:
            continue
        if dtype == "str" and isinstance(actual, pd.CategoricalDtype):
            continue
        if dtype == "Int64" and str(actual) in _NARROW_INTS:
            continue
        return False
    return True


def _coerce(values: pd.Series, dtype: str) -> pd.Series:
    if dtype.startswith("datetime64"):
        if isinstance(values.dtype, pd.DatetimeTZDtype):
            stamps = values.dt.tz_convert("UTC")
        elif pd.api.types.is_datetime64_dtype(values.dtype):
            stamps = values.dt.tz_localize("UTC")
        else:
            stamps = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
        return stamps.astype(dtype)
    if dtype == "Int64":
        return pd.to_numeric(values, errors="coerce").round().astype("Int64")
    if dtype == "float64":
        return pd.to_numeric(values, errors="coerce").astype("float64")
    if isinstance(values.dtype, pd.CategoricalDtype) and all(isinstance(c, str) for c in values.cat.categories):
        return values  # strings already, held as categories (see summarize_run)
    return values.astype("str")


# --------------------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    """A JSON-safe float: ``None`` for missing, NaN or infinite values."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _iso(stamp: Any) -> str | None:
    if stamp is None or pd.isna(stamp):
        return None
    return pd.Timestamp(stamp).tz_convert("UTC").isoformat().replace("+00:00", "Z")


def _parse_time(value: Any) -> pd.Timestamp | None:
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


def _percentiles(values: np.ndarray, qs: Mapping[str, float]) -> dict[str, float | None]:
    if values.size == 0:
        return {name: None for name in qs}
    return {name: _num(np.percentile(values, q)) for name, q in qs.items()}


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


def _run(df: pd.DataFrame) -> dict[str, Any]:
    run = df.attrs.get("run")
    return run if isinstance(run, dict) else {}


def _category(series: pd.Series) -> pd.Series:
    """``series`` as categories (as it is when it already is)."""
    return series if isinstance(series.dtype, pd.CategoricalDtype) else series.astype("category")


def _label(series: pd.Series, missing: str) -> pd.Series:
    """``series`` as categories with ``missing`` for missing values: grouping by it costs a code per row."""
    cat = _category(series)
    if cat.isna().any():
        if missing not in cat.cat.categories:
            cat = cat.cat.add_categories([missing])
        cat = cat.fillna(missing)
    return cat


def _place(df: pd.DataFrame) -> pd.Series:
    """Where each request ran: the scheduler node, else the hostname, else ``"unknown"`` (as categories)."""
    node = _label(df["node"], "unknown")
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


_PLACE_COLUMNS = ("node", "hostname", "worker", "status", "latency_s", "completion_tokens", "started_at", "finished_at")


def _ran(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that reached a worker: they started, or name a node or host (not e.g. ``invalid_input`` rows).

    Only the columns the per-node and per-worker tables read, and no copy when every row ran.
    """
    ran = df["started_at"].notna() | df["node"].notna() | df["hostname"].notna()
    return df if ran.all() else df.loc[ran, list(_PLACE_COLUMNS)]


def _ok(df: pd.DataFrame) -> pd.Series:
    return df["status"] == "ok"


# --------------------------------------------------------------------------- summary


def wall_clock(df: pd.DataFrame) -> dict[str, Any]:
    """The wall clock of the run: ``{"start", "end", "wall_s", "basis"}``.

    Start is ``run.json`` ``started_at``, else the first ``submitted_at``
    (else first ``started_at``). End is ``run.json`` ``finished_at``, else the
    last ``finished_at`` of a row. ``wall_s`` is ``None`` when either end is
    unknown or the span is not positive.
    """
    run = _run(df)
    start, end = _parse_time(run.get("started_at")), _parse_time(run.get("finished_at"))
    basis_start, basis_end = "run.json started_at", "run.json finished_at"
    if start is None:
        first = df["submitted_at"].min() if df["submitted_at"].notna().any() else df["started_at"].min()
        start = None if pd.isna(first) else pd.Timestamp(first)
        basis_start = "first submitted_at"
    if end is None:
        last = df["finished_at"].max()
        end = None if pd.isna(last) else pd.Timestamp(last)
        basis_end = "last finished_at"
    wall = (end - start).total_seconds() if start is not None and end is not None else None
    return {
        "start": _iso(start),
        "end": _iso(end),
        "wall_s": wall if wall is not None and wall > 0 else None,
        "basis": f"{basis_start} -> {basis_end}",
    }


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """All run-level metrics of ``df`` (from :func:`load_run`) as a JSON-serialisable dict.

    Sections (each documented by the function that computes it):
    ``run`` (metadata, ``partial`` flag, notes), ``counts`` (:func:`_counts`),
    ``wall`` (:func:`wall_clock`), ``wall_s``, ``throughput``, ``tokens``
    (:func:`_throughput`), ``latency_s`` and ``queue_s`` (:func:`_latency`,
    :func:`_queue`), ``busy_agent_s``, ``agent_slots``, ``parallel_efficiency``
    (:func:`_efficiency`), ``agents``, ``nodes``, ``workers`` (per-group
    tables), ``allocation`` (:func:`_allocation`, ``None`` without scheduler
    blocks), ``cost`` (:func:`_cost`, ``None`` without prices), ``errors`` and
    ``slowest``.
    """
    if not _is_normal(df, SUMMARY_COLUMNS):
        df = normalize(df)
    run = _run(df)
    wall = wall_clock(df)
    wall_s = wall["wall_s"]
    counts = {**_counts(df), "unfinished": int(run.get("unfinished") or 0)}
    tokens, throughput = _throughput(df, counts, wall_s)
    allocation = _allocation(df, wall)
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "run": _run_section(df, run, counts),
        "counts": counts,
        "wall": wall,
        "wall_s": wall_s,
        "throughput": throughput,
        "tokens": tokens,
        "latency_s": _latency(df),
        "queue_s": _queue(df),
        **_efficiency(df, run, wall_s),
        "agents": _agents(df, run, wall_s),
        "nodes": _nodes(df, wall_s),
        "workers": _workers(df, run, wall_s),
        "allocation": allocation,
        "cost": _cost(df, run, wall_s, allocation, tokens),
        "errors": _errors(df),
        "slowest": _slowest(df),
    }
    return summary


def summarize_run(path: str | Path) -> dict[str, Any]:
    """``summarize(load_run(path))``, with memory to spare for a million rows.

    ``results.parquet`` is read column by column into a compact frame (see
    :func:`_read_compact`). The numbers are the same as from :func:`load_run`
    (tests compare both).
    """
    run_dir = Path(path)
    parquet = run_dir / "results.parquet"
    try:
        df = _read_compact(parquet) if parquet.exists() else None
    except Exception:  # pyarrow raises many types for a damaged file: load_run says what it can
        df = None
    if df is None:
        return summarize(load_run(run_dir, columns=SUMMARY_COLUMNS))
    notes: list[str] = []
    df.attrs.update(run=_read_run_json(run_dir / "run.json", notes), run_dir=str(run_dir), source="results.parquet", notes=notes)
    return summarize(df)


def _read_compact(parquet: Path) -> pd.DataFrame:
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
        _fill_rows(df, file, "custom_id", np.flatnonzero(_slowest_candidates(df["latency_s"]).to_numpy()))
    if "error" in names:
        _fill_first_errors(df, file)
    if not _is_normal(df, SUMMARY_COLUMNS):  # e.g. a column written with another type: the general path
        df = normalize(df)
    return df


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
    kinds = _label(df["error_type"], "other").cat.codes.to_numpy()
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


def write_summary(path: str | Path) -> Path:
    """Write ``<run_dir>/summary.json`` from the run directory's own files and return its path.

    The pipeline calls this after writing ``run.json`` and the results, so
    ``summary.json`` holds exactly what ``parsl-chat report --json`` prints.
    """
    run_dir = Path(path)
    target = run_dir / "summary.json"
    atomic_write(target, json.dumps(summarize_run(run_dir), indent=2) + "\n")
    return target


def _run_section(df: pd.DataFrame, run: Mapping[str, Any], counts: Mapping[str, Any]) -> dict[str, Any]:
    """Run metadata; ``partial`` is true when the status is running/interrupted or rows came from the ledger."""
    status = run.get("status")
    source = df.attrs.get("source", "results.parquet")
    notes = list(df.attrs.get("notes", []))
    partial = status in PARTIAL_STATUSES or source == "ledger.jsonl"
    if status in ("running", "interrupted"):
        notes.append(f"run status is {status!r}: the numbers cover the {counts['prompts']} prompt(s) recorded so far")
    if counts.get("unfinished"):
        notes.append(
            f"{counts['unfinished']} prompt(s) unfinished at the stop ({run.get('stop_reason') or 'stopped'}): "
            "not failed, 'parsl-chat run --resume' sends them"
        )
    elif status == "failed":
        notes.append(
            f"run status is 'failed': {counts['error']} of {counts['prompts']} prompts failed, "
            "more than --max-failures allows; every prompt is recorded"
        )
    return {
        "run_id": run.get("run_id") or (Path(str(df.attrs["run_dir"])).name if df.attrs.get("run_dir") else None),
        "run_dir": df.attrs.get("run_dir"),
        "status": status,
        "version": run.get("version"),
        "executor": run.get("executor"),
        "routing": run.get("routing"),
        "prompts_file": run.get("prompts_file"),
        "command": run.get("command"),
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "workers": run.get("workers"),
        "agent_slots": run.get("agent_slots"),
        "source": source,
        "partial": bool(partial),
        "notes": notes,
    }


def _counts(df: pd.DataFrame) -> dict[str, Any]:
    """``prompts`` rows; ``ok``/``error`` by status; ``errors_by_type`` error rows per
    ``error_type`` (missing type counted as ``other``); ``retried`` rows with
    ``attempts > 1``; ``not_started`` rows without ``started_at``."""
    ok = _ok(df)
    errors = _label(df.loc[~ok, "error_type"], "other")
    by_type = {str(k): int(v) for k, v in sorted(errors.value_counts().items(), key=lambda kv: str(kv[0])) if v}
    return {
        "prompts": len(df),
        "ok": int(ok.sum()),
        "error": int((~ok).sum()),
        "errors_by_type": by_type,
        "retried": int((df["attempts"].fillna(0) > 1).sum()),
        "not_started": int(df["started_at"].isna().sum()),
    }


def _throughput(df: pd.DataFrame, counts: Mapping[str, Any], wall_s: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokens (sums over rows that report them) and rates over the wall clock.

    ``prompts_per_s`` = recorded prompts (ok + error) / wall; ``ok_per_s`` =
    successful prompts / wall; ``completion_tokens_per_s`` and
    ``total_tokens_per_s`` (prompt + completion) / wall.
    """
    prompt = int(df["prompt_tokens"].fillna(0).sum())
    completion = int(df["completion_tokens"].fillna(0).sum())
    tokens = {
        "prompt": prompt,
        "completion": completion,
        "total": prompt + completion,
        "mean_completion_per_ok": _ratio(float(completion), float(counts["ok"])),
    }
    throughput = {
        "prompts_per_s": _ratio(float(counts["prompts"]), wall_s),
        "ok_per_s": _ratio(float(counts["ok"]), wall_s),
        "completion_tokens_per_s": _ratio(float(completion), wall_s),
        "total_tokens_per_s": _ratio(float(prompt + completion), wall_s),
    }
    return tokens, throughput


def _latency(df: pd.DataFrame) -> dict[str, Any] | None:
    """``latency_s`` of successful rows: count, p50/p95/p99, mean, min, max. ``None`` without one."""
    values = df.loc[_ok(df), "latency_s"].dropna().to_numpy(dtype=float)
    if values.size == 0:
        return None
    return {
        "n": int(values.size),
        **_percentiles(values, {"p50": 50, "p95": 95, "p99": 99}),
        "mean": _num(values.mean()),
        "min": _num(values.min()),
        "max": _num(values.max()),
    }


def _queue(df: pd.DataFrame) -> dict[str, Any] | None:
    """``queue_s`` (submitted -> started) of every row that has one: p50/p95, mean, max."""
    values = df["queue_s"].dropna().to_numpy(dtype=float)
    if values.size == 0:
        return None
    return {
        "n": int(values.size),
        **_percentiles(values, {"p50": 50, "p95": 95}),
        "mean": _num(values.mean()),
        "max": _num(values.max()),
    }


def _slots(run: Mapping[str, Any]) -> int | None:
    """``run.json`` ``agent_slots``, else the sum of the agents' ``concurrency``."""
    slots = run.get("agent_slots")
    if isinstance(slots, (int, float)) and slots > 0:
        return int(slots)
    agents = run.get("agents") or []
    total = sum(int(a.get("concurrency") or 0) for a in agents if isinstance(a, dict))
    return total or None


def _efficiency(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> dict[str, Any]:
    """``parallel_efficiency`` = busy agent-seconds / (``agent_slots`` x wall_s).

    Busy agent-seconds is the sum of ``latency_s`` over every row (ok and
    failed). 1.0 means every slot had a request in flight for the whole wall clock.
    """
    busy = float(df["latency_s"].fillna(0).sum())
    slots = _slots(run)
    capacity = slots * wall_s if slots and wall_s else None
    return {"busy_agent_s": busy, "agent_slots": slots, "parallel_efficiency": _ratio(busy, capacity)}


def _group_records(df: pd.DataFrame, keys: Mapping[str, pd.Series]) -> list[dict[str, Any]]:
    """Per group of ``keys``: prompts, ok, error, busy_s (sum of latency_s), completion_tokens.

    Sorted by the keys' text. Counted with numpy on category codes: a few arrays of a number per row.
    """
    labels = [_label(series, "unknown") for series in keys.values()]
    categories = [label.cat.categories for label in labels]
    group, present, space = _combinations([label.cat.codes.to_numpy() for label in labels], categories)
    prompts = np.bincount(group, minlength=space)
    ok = np.bincount(group, weights=_ok(df).to_numpy(dtype=float), minlength=space)
    busy = np.bincount(group, weights=df["latency_s"].to_numpy(dtype=float, na_value=0.0), minlength=space)
    tokens = np.bincount(group, weights=df["completion_tokens"].to_numpy(dtype=float, na_value=0.0), minlength=space)
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


def _agents(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per agent (those of ``run.json`` first, then any other seen in the rows).

    ``utilisation`` = busy_s / (agent ``concurrency`` x wall_s): the fraction
    of the agent's slots in use on average. Latency percentiles over its ok rows.
    """
    declared = {str(a.get("name")): a for a in (run.get("agents") or []) if isinstance(a, dict) and a.get("name")}
    key = _label(df["agent"], "unknown")
    groups = {str(r["agent"]): r for r in _group_records(df, {"agent": key})}
    names = list(declared) + sorted(set(groups) - set(declared))
    empty = {"prompts": 0, "ok": 0, "error": 0, "busy_s": 0.0, "completion_tokens": 0}
    ok = _ok(df)
    out = []
    for name in names:
        row = groups.get(name, empty)
        meta = declared.get(name, {})
        busy = float(row["busy_s"])
        concurrency = meta.get("concurrency")
        lat = df.loc[(key == name) & ok, "latency_s"].dropna().to_numpy(dtype=float)
        models = df.loc[key == name, "model"].dropna().unique()
        ctokens = int(row["completion_tokens"])
        out.append(
            {
                "agent": name,
                "model": meta.get("model") or (str(models[0]) if len(models) else None),
                "concurrency": concurrency,
                "weight": meta.get("weight"),
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": busy,
                "utilisation": _ratio(busy, concurrency * wall_s if concurrency and wall_s else None),
                "completion_tokens": ctokens,
                "completion_tokens_per_s": _ratio(float(ctokens), wall_s),
                "latency_p50_s": _percentiles(lat, {"p": 50})["p"],
                "latency_p95_s": _percentiles(lat, {"p": 95})["p"],
            }
        )
    return out


def _union_by_group(keys: pd.Series, started: pd.Series, finished: pd.Series) -> dict[str, float]:
    """:func:`busy_union_s` of the ``started`` -> ``finished`` intervals for every group of ``keys`` at once.

    One sort by group, then start, on the timestamps' integer ticks (views, no
    conversion); then each group's run of intervals is merged in place. A million
    rows cost three arrays of a number per row.
    """
    labels = _label(keys, "unknown")
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


def _nodes(df: pd.DataFrame, wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per node (``node``, else ``hostname``).

    Only rows that reached a worker count (see :func:`_ran`).
    ``share_prompts`` = its prompts / prompts on all nodes; ``share_busy`` =
    its busy seconds / all busy seconds; ``active_s`` = union of its request
    intervals (time with at least one request in flight); ``active_fraction``
    = active_s / wall_s; ``workers`` distinct workers seen on it.
    """
    df = _ran(df)
    place = _place(df)
    records = _group_records(df, {"node": place})
    total_busy = float(sum(r["busy_s"] for r in records))
    active = _union_by_group(place, df["started_at"], df["finished_at"])
    hostnames: dict[str, set[str]] = {}
    for name, host in _distinct_pairs(place, df["hostname"]):
        hostnames.setdefault(name, set()).add(host)
    workers: dict[str, int] = {}
    for name, _ in _distinct_pairs(place, df["worker"]):
        workers[name] = workers.get(name, 0) + 1
    out = []
    for row in records:
        name = str(row["node"])
        ctokens = int(row["completion_tokens"])
        node_active = active.get(name, 0.0)
        out.append(
            {
                "node": name,
                "hostnames": sorted(hostnames.get(name, set())),
                "workers": workers.get(name, 0),
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": float(row["busy_s"]),
                "share_prompts": _ratio(float(row["prompts"]), float(len(df))),
                "share_busy": _ratio(float(row["busy_s"]), total_busy),
                "active_s": node_active,
                "active_fraction": _ratio(node_active, wall_s),
                "completion_tokens": ctokens,
                "completion_tokens_per_s": _ratio(float(ctokens), wall_s),
            }
        )
    return out


def _distinct_pairs(first: pd.Series, second: pd.Series) -> list[tuple[str, str]]:
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


def _slots_per_worker(run: Mapping[str, Any]) -> float | None:
    """Request slots each worker process holds: ``agent_slots`` / ``workers`` (a worker runs many requests at once)."""
    slots, workers = _slots(run), run.get("workers")
    if slots and isinstance(workers, (int, float)) and workers > 0:
        return max(1.0, slots / workers)
    return None


def _workers(df: pd.DataFrame, run: Mapping[str, Any], wall_s: float | None) -> list[dict[str, Any]]:
    """One entry per (node, worker). ``slots``: the requests it may have in flight at once,
    ``agent_slots`` / ``workers`` for a Parsl worker and every agent slot of the run for the
    driver's own process (``run.json`` ``driver_workers``: ``--no-parsl``, and a warm start's
    first chunks); without those in run.json, 1. ``utilisation`` = busy_s / (slots x wall_s):
    1.0 means every slot of the worker was busy the whole run. Rows as in :func:`_nodes`."""
    df = _ran(df)
    place = _place(df)
    worker = _label(df["worker"], "unknown")
    per_worker = _slots_per_worker(run) or 1.0
    driver = {str(w) for w in run.get("driver_workers") or []}
    out = []
    for row in _group_records(df, {"node": place, "worker": worker}):
        slots = float(_slots(run) or per_worker) if str(row["worker"]) in driver else per_worker
        out.append(
            {
                "worker": str(row["worker"]),
                "node": str(row["node"]),
                "slots": slots,
                "prompts": int(row["prompts"]),
                "ok": int(row["ok"]),
                "error": int(row["error"]),
                "busy_s": float(row["busy_s"]),
                "utilisation": _ratio(float(row["busy_s"]), wall_s * slots if wall_s else None),
            }
        )
    return out


def _block_rows(df: pd.DataFrame, block: Mapping[str, Any]) -> pd.Series:
    """Rows that ran on ``block``, started while it was up: each driver of a resumed run numbers
    its blocks from 0 again. Rows with the same ``block`` id; for a block without an id (a
    driver's own process: ``--no-parsl``, a warm start's first chunks), rows without one on its nodes."""
    name = block.get("block")
    if name is not None:
        rows = (df["block"] == str(name)).fillna(False)
    else:
        nodes = [str(n) for n in block.get("nodes") or []]
        rows = df["block"].isna() & _place(df).isin(nodes)
    began, ended = _parse_time(block.get("submitted_at")), _parse_time(block.get("ended_at"))
    started = pd.to_datetime(df["started_at"], utc=True)
    if began is not None:
        rows &= (started >= began).fillna(False)
    if ended is not None:
        rows &= (started <= ended).fillna(False)
    return rows


def _allocation(df: pd.DataFrame, wall: Mapping[str, Any]) -> dict[str, Any] | None:
    """Scheduler allocation use, when ``run.json`` lists blocks with a job id or nodes.

    Per block: ``start`` = block ``started_at`` if run.json has it, else the
    first ``started_at`` of a request on the block (an approximation: node
    start-up before the first request is not counted), else its
    ``submitted_at``; ``end`` = block ``ended_at``, else run end (wall clock
    end); ``allocated_node_s`` = nodes x (end - start); ``queue_wait_s`` =
    first request ``started_at`` on the block - block ``submitted_at``.
    Per node: ``allocated_s`` (sum over its blocks), ``busy_s`` = union of its
    request intervals (time with at least one request in flight), ``idle_s``
    = allocated - busy (not below 0). Totals: ``node_s_allocated``,
    ``node_s_busy``, ``node_s_idle``, ``busy_fraction`` = busy / allocated.
    """
    run = _run(df)
    blocks = [b for b in run.get("blocks") or [] if isinstance(b, dict) and (b.get("job_id") or b.get("nodes"))]
    if not blocks:
        return None
    run_end = _parse_time(wall.get("end"))
    place = _place(df)
    node_alloc: dict[str, float] = {}
    out_blocks = []
    block_rows = [_block_rows(df, block) for block in blocks]
    for block, rows in zip(blocks, block_rows, strict=True):
        entry, nodes = _block_entry(df, block, rows, place, run_end)
        out_blocks.append(entry)
        for node in nodes:
            node_alloc[node] = node_alloc.get(node, 0.0) + (entry["duration_s"] or 0.0)
    on_blocks = np.logical_or.reduce([rows.to_numpy(dtype=bool) for rows in block_rows])
    # busy: only the requests that ran on the blocks counted as allocated (not a warm start's driver)
    union = _union_by_group(place[on_blocks], df["started_at"][on_blocks], df["finished_at"][on_blocks])
    per_node: list[dict[str, Any]] = []
    for node, allocated in node_alloc.items():
        busy = union.get(node, 0.0)
        per_node.append({"node": node, "allocated_s": allocated, "busy_s": busy, "idle_s": max(0.0, allocated - busy)})
    allocated_total = float(sum(n["allocated_s"] for n in per_node))
    busy_total = float(sum(n["busy_s"] for n in per_node))
    job_ids = [str(b["job_id"]) for b in blocks if b.get("job_id")]
    job_ids += sorted(set(df["job_id"].dropna().astype(str)) - set(job_ids))
    return {
        "job_ids": job_ids,
        "nodes": list(node_alloc),
        "blocks": out_blocks,
        "per_node": per_node,
        "node_s_allocated": allocated_total,
        "node_s_busy": busy_total,
        "node_s_idle": float(sum(n["idle_s"] for n in per_node)),
        "busy_fraction": _ratio(busy_total, allocated_total),
    }


def _block_entry(
    df: pd.DataFrame, block: Mapping[str, Any], rows: pd.Series, place: pd.Series, run_end: pd.Timestamp | None
) -> tuple[dict[str, Any], list[str]]:
    nodes = [str(n) for n in block.get("nodes") or []] or sorted(set(place[rows]))
    submitted = _parse_time(block.get("submitted_at"))
    first = df.loc[rows, "started_at"].min()
    first_start = None if pd.isna(first) else pd.Timestamp(first)
    last = df.loc[rows, "finished_at"].max()
    if _parse_time(block.get("started_at")) is not None:
        start, start_basis = _parse_time(block.get("started_at")), "block started_at"
    elif first_start is not None:
        start, start_basis = first_start, "first request started_at"
    else:
        start, start_basis = submitted, "block submitted_at"
    end, end_basis = _parse_time(block.get("ended_at")), "block ended_at"
    if end is None:
        end, end_basis = run_end, "run end"
    if end is None and not pd.isna(last):
        end, end_basis = pd.Timestamp(last), "last request finished_at"
    duration = max(0.0, (end - start).total_seconds()) if start is not None and end is not None else None
    queue = (first_start - submitted).total_seconds() if first_start is not None and submitted is not None else None
    entry = {
        "block": str(block.get("block")),
        "job_id": None if block.get("job_id") is None else str(block.get("job_id")),
        "nodes": nodes,
        "cores_per_node": block.get("cores_per_node"),
        "prompts": int(rows.sum()),
        "submitted_at": _iso(submitted),
        "start": _iso(start),
        "start_basis": start_basis,
        "end": _iso(end),
        "end_basis": end_basis,
        "duration_s": duration,
        "queue_wait_s": queue,
        "allocated_node_s": len(nodes) * duration if duration is not None else None,
    }
    return entry, nodes


def _cost(
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
    total_tokens = float(tokens["total"])
    ok = float(_ok(df).sum())
    if prices.get("su_per_node_hour") is not None:
        rate = float(prices["su_per_node_hour"])
        if allocation and allocation["node_s_allocated"] > 0:
            node_hours, basis = allocation["node_s_allocated"] / 3600.0, "allocated node-hours"
        else:
            nodes = max(1, int(_place(_ran(df)).nunique()))
            node_hours = (wall_s or 0.0) / 3600.0 * nodes
            basis = f"wall hours x {nodes} node(s) seen"
        su = rate * node_hours
        return {
            "unit": "SU",
            "su_per_node_hour": rate,
            "node_hours": node_hours,
            "basis": basis,
            "su": su,
            "su_per_1m_tokens": _ratio(su * 1e6, total_tokens),
            "su_per_1k_ok_prompts": _ratio(su * 1e3, ok),
        }
    if prices.get("usd_per_1m_prompt_tokens") is not None or prices.get("usd_per_1m_completion_tokens") is not None:
        p_rate = float(prices.get("usd_per_1m_prompt_tokens") or 0.0)
        c_rate = float(prices.get("usd_per_1m_completion_tokens") or 0.0)
        usd = tokens["prompt"] / 1e6 * p_rate + tokens["completion"] / 1e6 * c_rate
        return {
            "unit": "USD",
            "usd_per_1m_prompt_tokens": p_rate,
            "usd_per_1m_completion_tokens": c_rate,
            "basis": "token prices",
            "usd": usd,
            "usd_per_1m_tokens": _ratio(usd * 1e6, total_tokens),
            "usd_per_1k_ok_prompts": _ratio(usd * 1e3, ok),
        }
    return None


def _errors(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Failed rows per ``error_type`` (most frequent first) with the first error message as an example."""
    failed = df.loc[~_ok(df)]
    if failed.empty:
        return []
    kinds = _label(failed["error_type"], "other")
    counts = sorted(((k, v) for k, v in kinds.value_counts().items() if v), key=lambda kv: (-int(kv[1]), str(kv[0])))
    out = []
    for kind, count in counts:
        messages = failed.loc[kinds == kind, "error"].dropna()
        example = str(messages.iloc[0]) if len(messages) else None
        out.append({"error_type": str(kind), "count": int(count), "example": example[:300] if example else None})
    return out


def _slowest_candidates(latency: pd.Series, n: int = SLOWEST_N) -> pd.Series:
    """Rows that can be among the ``n`` slowest: latency at least the n-th largest (ties all kept)."""
    if latency.notna().sum() <= n:
        return latency.notna()
    values = latency.to_numpy(dtype=float, na_value=np.nan)
    # the n largest of each block, then of those: no sorted copy of a million latencies
    tops = [np.sort(block[~np.isnan(block)])[-n:] for block in np.array_split(values, max(1, len(values) // 65536))]
    return latency >= np.sort(np.concatenate(tops))[-n]


def _slowest(df: pd.DataFrame, n: int = SLOWEST_N) -> list[dict[str, Any]]:
    """The ``n`` rows with the largest ``latency_s`` (ok or failed; ties by ``custom_id``)."""
    rows = df.loc[_slowest_candidates(df["latency_s"], n), ["custom_id", "agent", "status", "latency_s", "attempts"]].copy()
    rows["custom_id"] = rows["custom_id"].astype("str")  # ties sort by the id's text, not a category's position
    rows["node"] = _place(df.loc[rows.index]).astype("str")
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


# --------------------------------------------------------------------------- comparison


def _nodes_used(summary: Mapping[str, Any]) -> int | None:
    """Nodes of the run: the allocation's nodes, else distinct nodes in the rows."""
    allocation = summary.get("allocation")
    if allocation and allocation.get("nodes"):
        return len(allocation["nodes"])
    return len(summary["nodes"]) or None


def compare(runs: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Scaling table: one row per run, the first run is the baseline.

    ``speedup`` = ok_per_s / ok_per_s of the baseline (successful prompts per
    second; equal to the wall-time ratio when the runs did the same prompts).
    ``resource`` says what is scaled: ``nodes`` when the runs differ in node
    count, else ``agent_slots`` (``workers`` when slots are unknown).
    ``ideal_speedup`` = resources / baseline resources; ``efficiency`` =
    speedup / ideal_speedup (1.0 = perfect scaling).
    """
    summaries = [summarize(df) for df in runs]
    columns = [
        "run_id",
        "run_dir",
        "status",
        "prompts",
        "ok",
        "nodes",
        "workers",
        "agent_slots",
        "wall_s",
        "prompts_per_s",
        "ok_per_s",
        "parallel_efficiency",
        "resource",
        "resources",
        "speedup",
        "ideal_speedup",
        "efficiency",
    ]
    if not summaries:
        return pd.DataFrame(columns=columns)
    rows = [_compare_row(s) for s in summaries]
    resource = _scaled_resource(rows)
    base = rows[0]
    for row in rows:
        row["resource"] = resource
        row["resources"] = row[resource]
        row["speedup"] = _ratio(row["ok_per_s"], base["ok_per_s"])
        row["ideal_speedup"] = _ratio(_num(row["resources"]), _num(base["resources"]))
        row["efficiency"] = _ratio(row["speedup"], row["ideal_speedup"])
    table = pd.DataFrame(rows, columns=columns)
    for column in ("wall_s", "prompts_per_s", "ok_per_s", "parallel_efficiency", "speedup", "ideal_speedup", "efficiency"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    for column in ("nodes", "workers", "agent_slots", "resources"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    return table


def _compare_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    run = summary["run"]
    workers = run.get("workers") or len(summary["workers"]) or None
    return {
        "run_id": run.get("run_id"),
        "run_dir": run.get("run_dir"),
        "status": run.get("status"),
        "prompts": summary["counts"]["prompts"],
        "ok": summary["counts"]["ok"],
        "nodes": _nodes_used(summary),
        "workers": workers,
        "agent_slots": summary.get("agent_slots"),
        "wall_s": summary["wall_s"],
        "prompts_per_s": summary["throughput"]["prompts_per_s"],
        "ok_per_s": summary["throughput"]["ok_per_s"],
        "parallel_efficiency": summary["parallel_efficiency"],
    }


def _scaled_resource(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    nodes = {r["nodes"] for r in rows}
    if len(nodes) > 1 and None not in nodes:
        return "nodes"
    if all(r["agent_slots"] for r in rows):
        return "agent_slots"
    if all(r["workers"] for r in rows):
        return "workers"
    return "nodes"


def now_utc() -> str:
    """The current time as ISO-8601 UTC (for report footers)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
