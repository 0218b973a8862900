"""Reading a run directory into one frame, one row per prompt, with the result columns of docs/interfaces.md."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..io.rundir import run_meta_or_note

__all__ = ["LEDGER_CHUNK", "RESULT_COLUMNS", "SUMMARY_COLUMNS", "is_normal", "load_run", "normalize", "read_run_json"]


#: The result columns of docs/interfaces.md (the original list, then those added), in order, with the dtype
#: :func:`normalize` gives them.
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
    "parsed": "str",  # added to the original list (docs/interfaces.md): a structured answer as JSON text
    "cached": "boolean",
    "cached_from": "str",
    "cached_at": "datetime64[us, UTC]",
    "cached_latency_s": "float64",
    "server_queue_s": "float64",
    "server_prompt_s": "float64",
    "server_generation_s": "float64",
}


#: what :func:`summarize` reads: every result column but the answers' text and a few it never looks at
SUMMARY_COLUMNS = tuple(
    c
    for c in RESULT_COLUMNS
    if c not in ("response", "parsed", "endpoint", "finish_reason", "conversation", "turn", "line", "cached_from", "cached_at")
)


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
    run = read_run_json(run_dir, notes)
    df, source = _read_rows(parquet, ledger, notes, columns)
    df = normalize(df)
    df.attrs["run"] = run
    df.attrs["run_dir"] = str(run_dir)
    df.attrs["source"] = source
    df.attrs["notes"] = notes
    return df


def read_run_json(run_dir: Path, notes: list[str]) -> dict[str, Any]:
    """The run's run.json, or ``{}`` with a note saying why there is none."""
    meta, why = run_meta_or_note(run_dir)
    if why is not None:
        notes.append(why)
    return meta


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


#: ledger records parsed into one frame at a time
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
    """Return ``df`` with every result column (docs/interfaces.md) present, in order, with its dtype.

    Strings become pandas strings (missing values stay missing), integers
    nullable ``Int64``, timestamps ``datetime64[us, UTC]`` (ISO strings are
    parsed), durations ``float64``. Extra columns are kept after those.
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


def is_normal(df: pd.DataFrame, columns: Iterable[str]) -> bool:
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
    if dtype == "boolean":
        return values.map(_to_bool, na_action="ignore").astype("boolean")
    if isinstance(values.dtype, pd.CategoricalDtype) and all(isinstance(c, str) for c in values.cat.categories):
        return values  # strings already, held as categories (see summarize_run)
    return values.astype("str")


def _to_bool(value: Any) -> Any:
    """A flag read back from Parquet (bool), the ledger (JSON true/false) or CSV (text)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    return True if text in ("true", "1") else False if text in ("false", "0") else pd.NA
