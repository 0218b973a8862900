"""Results files written from the ledger: Parquet, CSV and OpenAI Batch output.

Rows are streamed from the ledger in batches (memory stays flat however many
prompts there are), keeping only the last record of each id, and each file is
written under a temporary name and renamed into place, so a crash never
leaves a half-written Parquet behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .ledger import id_hash, read_ledger

__all__ = ["COLUMNS", "SCHEMA", "batch_output_line", "write_results"]

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("line", pa.int64()),
        ("agent", pa.string()),
        ("model", pa.string()),
        ("endpoint", pa.string()),
        ("hostname", pa.string()),
        ("node", pa.string()),
        ("worker", pa.string()),
        ("block", pa.string()),
        ("job_id", pa.string()),
        ("conversation", pa.string()),
        ("turn", pa.int64()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int64()),
        ("submitted_at", _TS),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("queue_s", pa.float64()),
        ("latency_s", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("response", pa.string()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
BATCH_ROWS = 10_000


def _winners(ledger_path: Path) -> np.ndarray:
    """Positions (record numbers) of the last record of each id."""
    hashes = np.fromiter((id_hash(r["custom_id"]) for r in read_ledger(ledger_path)), dtype=np.uint64)
    if not len(hashes):
        return np.zeros(0, dtype=np.int64)
    # reverse so that np.unique's "first occurrence" is the last record
    rev = hashes[::-1]
    _, first = np.unique(rev, return_index=True)
    return np.sort(len(hashes) - 1 - first)


def _batches(ledger_path: Path) -> Iterator[list[dict[str, Any]]]:
    keep = _winners(ledger_path)
    pos = 0
    batch: list[dict[str, Any]] = []
    for n, row in enumerate(read_ledger(ledger_path)):
        if pos < len(keep) and keep[pos] == n:
            pos += 1
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = []
    for field in SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.type == _TS:
            columns.append(pa.array(values, type=pa.string()).cast(_TS))
        else:
            columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _epoch(stamp: Any) -> int | None:
    """The ledger's ISO-8601 time as Unix seconds: OpenAI's ``created`` is an integer."""
    if not isinstance(stamp, str):
        return None
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return None


def batch_output_line(row: dict[str, Any], n: int) -> dict[str, Any]:
    """One line of OpenAI Batch output format for a result row."""
    if row.get("status") == "ok":
        created = _epoch(row.get("finished_at"))
        body = {
            "id": f"chatcmpl-{row['custom_id']}",
            "object": "chat.completion",
            "created": created,
            "model": row.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": row.get("response")},
                    "finish_reason": row.get("finish_reason"),
                }
            ],
            "usage": {
                "prompt_tokens": row.get("prompt_tokens"),
                "completion_tokens": row.get("completion_tokens"),
                "total_tokens": (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0),
            },
        }
        return {
            "id": f"batch_req_{n:08d}",
            "custom_id": row["custom_id"],
            "response": {"status_code": 200, "request_id": f"req_{n:08d}", "body": body},
            "error": None,
        }
    return {
        "id": f"batch_req_{n:08d}",
        "custom_id": row["custom_id"],
        "response": None,
        "error": {"code": row.get("error_type") or "other", "message": row.get("error") or ""},
    }


def write_results(run_dir: Path) -> int:
    """(Re)write results.parquet, results.csv and output.jsonl from the ledger; returns the row count."""
    ledger_path = run_dir / "ledger.jsonl"
    targets = {name: run_dir / name for name in ("results.parquet", "results.csv", "output.jsonl")}
    tmp = {name: path.with_name(f".{path.name}.tmp") for name, path in targets.items()}
    count = 0
    with (
        pq.ParquetWriter(tmp["results.parquet"], SCHEMA, compression="zstd") as parquet,
        tmp["results.csv"].open("wb") as csv_fh,
        tmp["output.jsonl"].open("w", encoding="utf-8") as out_fh,
    ):
        csv_writer = pacsv.CSVWriter(csv_fh, SCHEMA)
        for rows in _batches(ledger_path):
            table = _to_table(rows)
            parquet.write_table(table)
            csv_writer.write_table(table)
            for row in rows:
                count += 1
                out_fh.write(json.dumps(batch_output_line(row, count), ensure_ascii=False) + "\n")
        if count == 0:
            empty = SCHEMA.empty_table()
            parquet.write_table(empty)
            csv_writer.write_table(empty)
        csv_writer.close()
    for name, path in targets.items():
        os.replace(tmp[name], path)
    return count
