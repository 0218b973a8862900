"""Results files written from the ledger: Parquet, CSV and OpenAI Batch output and error files.

Rows are streamed from the ledger in batches (memory stays flat however many
prompts there are), keeping only the last record of each id, and each file is
written under a temporary name and renamed into place, so a crash never
leaves a half-written Parquet behind.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .. import _memory
from ..core.structured import flat_column_names
from .ledger import id_hash, read_ledger
from .rows import LedgerRow
from .rundir import run_meta_or_note

__all__ = ["COLUMNS", "SCHEMA", "OutputPlan", "batch_error_line", "batch_output_line", "write_results"]

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
        ("parsed", pa.string()),  # a structured answer as JSON text (parsl_chat.core.structured); added (docs/interfaces.md)
        # the response cache: true = answered from it (no request), false = asked and missed, empty = not asked
        ("cached", pa.bool_()),
        ("cached_from", pa.string()),  # the run that sent the request, for a hit
        ("cached_at", _TS),  # when that run's answer came
        ("cached_latency_s", pa.float64()),  # that request's latency (a hit's own latency_s is empty)
        # where the server spent the latency (llama-server's per-response timings; null from other servers):
        # waiting for a slot, reading the prompt, generating
        ("server_queue_s", pa.float64()),
        ("server_prompt_s", pa.float64()),
        ("server_generation_s", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
BATCH_ROWS = 10_000


#: The ledger as Arrow's JSON reader parses it: timestamps stay ISO strings until cast.
_LEDGER_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if f.type == _TS else f for f in SCHEMA])
#: Bytes of JSON per Arrow block. Small: the streaming reader keeps many blocks in flight
#: (measured: 1M rows peak at 114 MB RSS with 256 KiB, 613 MB with 16 MiB).
_JSON_BLOCK_BYTES = 256 << 10


def _superseded(hashes: np.ndarray) -> np.ndarray | None:
    """Which records a later one with the same id hash replaces (a mask), or ``None`` when ids are unique.

    A stable sort puts each id's records in ledger order: every one but the last is followed by its own
    kind. Three arrays of a number per record at most, where np.unique's reverse-and-index took five.
    """
    if len(hashes) < 2:
        return None
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    followed = ordered[:-1] == ordered[1:]
    del ordered
    if not followed.any():
        return None  # the usual run: every id once
    superseded = np.zeros(len(hashes), dtype=bool)
    superseded[order[:-1][followed]] = True
    return superseded


def _python_batches(ledger_path: Path) -> Iterator[pa.RecordBatch]:
    """The last record of each id, in ledger order; tolerant of torn and garbled lines."""
    superseded = _superseded(np.fromiter((id_hash(r["custom_id"]) for r in read_ledger(ledger_path)), dtype=np.uint64))
    rows: list[LedgerRow] = []
    for n, row in enumerate(read_ledger(ledger_path)):
        if superseded is None or not superseded[n]:
            rows.append(row)
            if len(rows) >= BATCH_ROWS:
                yield _to_batch(rows)
                rows = []
    if rows:
        yield _to_batch(rows)


def _to_batch(rows: list[LedgerRow]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{k: row.get(k) for k in _LEDGER_SCHEMA.names} for row in rows], schema=_LEDGER_SCHEMA)


def _arrow_reader(ledger_path: Path) -> Iterator[pa.RecordBatch]:
    reader = pajson.open_json(
        ledger_path,
        read_options=pajson.ReadOptions(block_size=_JSON_BLOCK_BYTES, use_threads=False),
        parse_options=pajson.ParseOptions(explicit_schema=_LEDGER_SCHEMA, unexpected_field_behavior="ignore"),
    )
    for batch in reader:
        yield batch.select(_LEDGER_SCHEMA.names)


def _arrow_batches(ledger_path: Path) -> Iterator[pa.RecordBatch]:
    """As :func:`_python_batches`, parsed by Arrow; raises ``pa.ArrowInvalid`` on a bad line.

    ``write_results`` on 1M rows: 38.7 -> ~25 s (BENCHMARKS.md §3).
    """
    blocks = [
        np.fromiter((id_hash(i) for i in batch.column("custom_id").to_pylist()), dtype=np.uint64, count=batch.num_rows)
        for batch in _arrow_reader(ledger_path)
    ]
    hashes = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.uint64)
    del blocks  # one copy of the hashes while they are sorted, not two
    superseded = _superseded(hashes)
    del hashes
    _memory.release()
    offset = 0
    for batch in _arrow_reader(ledger_path):
        end = offset + batch.num_rows
        if superseded is None or not superseded[offset:end].any():
            yield batch
        elif not superseded[offset:end].all():
            yield batch.filter(pa.array(~superseded[offset:end]))
        offset = end


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of about ``rows`` rows (Arrow's JSON blocks are a few hundred rows each)."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        pending.append(batch)
        size += batch.num_rows
        if size >= rows:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            pending, size = [], 0
    if size:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _ledger_is_clean(ledger_path: Path) -> bool:
    """Whether Arrow can read the whole ledger: it exists, is not empty and ends with a complete line."""
    try:
        with ledger_path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except OSError:
        return False


def _to_table(batch: pa.RecordBatch, plan: OutputPlan) -> pa.Table:
    """A ledger batch in the results schema (ISO timestamps parsed), with the plan's flattened columns."""
    columns = [batch.column(field.name).cast(_TS) if field.type == _TS else batch.column(field.name) for field in SCHEMA]
    if plan.flat:
        columns += _flat_columns(batch.column("parsed").to_pylist(), plan)
    return pa.Table.from_arrays(columns, schema=plan.schema)


# --------------------------------------------------------------------------- flattened columns

_FLAT_ARROW = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(), "json": pa.string()}
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class OutputPlan:
    """How this run's files are written (run.json's ``output``, set from the config)."""

    #: top-level schema property -> (column name, column type), in schema order
    flat: dict[str, tuple[str, str]] = field(default_factory=dict)
    errors_in_output: bool = False

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([*SCHEMA, *((column, _FLAT_ARROW[kind]) for column, kind in self.flat.values())])

    @classmethod
    def of_run(cls, run_dir: Path) -> OutputPlan:
        """The plan run.json records; a run.json that is missing or unreadable means the defaults."""
        output = run_meta_or_note(run_dir)[0].get("output")
        if not isinstance(output, dict):
            return cls()
        types = (output.get("property_types") or {}) if output.get("flatten") else {}
        names = flat_column_names(types, set(COLUMNS))
        flat = {prop: (names[prop], kind if kind in _FLAT_ARROW else "json") for prop, kind in types.items()}
        return cls(flat=flat, errors_in_output=bool(output.get("errors_in_output")))


def _flat_value(value: Any, kind: str) -> Any:
    """One property's value in its column's type. The answer was validated, so a misfit is a
    value whose prompt used another schema: kept as JSON text where the column is text, else null."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return value if kind == "boolean" else None
    if kind == "integer" and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value) if _INT64[0] <= value <= _INT64[1] else None
    if kind == "number" and isinstance(value, (int, float)):
        return float(value)
    return None


def _flat_columns(parsed: list[str | None], plan: OutputPlan) -> list[pa.Array]:
    objects = [json.loads(text) if text else None for text in parsed]
    columns = []
    for prop, (_name, kind) in plan.flat.items():
        values = [_flat_value(obj.get(prop), kind) if isinstance(obj, dict) else None for obj in objects]
        columns.append(pa.array(values, type=_FLAT_ARROW[kind]))
    return columns


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


#: "HTTP 429: message": how agents.py words a failure that came with an HTTP answer
_HTTP_ERROR = re.compile(r"^HTTP (\d{3}): (.*)$", re.DOTALL)


def _openai_error_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


def batch_error_line(row: dict[str, Any], n: int) -> dict[str, Any]:
    """One line of the OpenAI Batch error file for a failed row.

    As OpenAI writes it (openai/openai-openapi#302): a request the endpoint
    answered with an HTTP error carries that answer in ``response`` (status
    code, and the error object in ``body``) with ``error`` null; one that got
    no HTTP answer (a timeout, a dropped connection, an answer that never
    matched its schema, a bad input line) has ``response`` null and
    ``error: {code, message}``, ``code`` being the row's ``error_type``.
    """
    code = row.get("error_type") or "other"
    message = row.get("error") or ""
    http = _HTTP_ERROR.match(message)
    if http is None:
        return {
            "id": f"batch_req_{n:08d}",
            "custom_id": row["custom_id"],
            "response": None,
            "error": {"code": code, "message": message},
        }
    status = int(http.group(1))
    error = {"message": http.group(2), "type": _openai_error_type(status), "param": None, "code": code}
    return {
        "id": f"batch_req_{n:08d}",
        "custom_id": row["custom_id"],
        "response": {"status_code": status, "request_id": f"req_{n:08d}", "body": {"error": error}},
        "error": None,
    }


#: the columns :func:`batch_output_line` reads
_OUTPUT_COLUMNS = ("custom_id", "status", "model", "response", "finish_reason", "finished_at",
                   "prompt_tokens", "completion_tokens", "error_type", "error")  # fmt: skip
#: rows turned into Python objects at a time for output.jsonl (a row is ~1 KB of dicts and strings)
_OUTPUT_SLICE_ROWS = 1_000


def _write_output_lines(out_fh: Any, err_fh: Any, batch: pa.RecordBatch, count: int, plan: OutputPlan) -> int:
    """Append ``batch`` to output.jsonl (answers) and errors.jsonl (failures), numbering rows after ``count``.

    Returns the new count. Ids number the rows of both files together, so each is
    unique across them. Only the columns the lines show, a slice at a time: the
    whole batch as Python dicts was most of the end-of-run memory and time.
    """
    columns = batch.select(list(_OUTPUT_COLUMNS))
    for start in range(0, columns.num_rows, _OUTPUT_SLICE_ROWS):
        answers, errors = [], []
        for row in columns.slice(start, _OUTPUT_SLICE_ROWS).to_pylist():
            count += 1
            if row.get("status") != "ok":
                errors.append(json.dumps(batch_error_line(row, count), ensure_ascii=False))
                if not plan.errors_in_output:
                    continue
            answers.append(json.dumps(batch_output_line(row, count), ensure_ascii=False))
        for fh, lines in ((out_fh, answers), (err_fh, errors)):
            if lines:
                fh.write("\n".join(lines) + "\n")
    return count


def write_results(run_dir: Path) -> int:
    """(Re)write results.parquet, results.csv, output.jsonl and errors.jsonl from the ledger; returns the row count."""
    ledger_path = run_dir / "ledger.jsonl"
    plan = OutputPlan.of_run(run_dir)
    _memory.map_large_blocks()  # from here on, arrays of a number per row go back to the system when freed
    if _ledger_is_clean(ledger_path):
        try:
            return _write_files(run_dir, _arrow_batches(ledger_path), plan)
        except pa.ArrowInvalid:
            pass  # a garbled line in the middle: the tolerant reader below skips it
    return _write_files(run_dir, _python_batches(ledger_path), plan)


def _write_files(run_dir: Path, batches: Iterator[pa.RecordBatch], plan: OutputPlan) -> int:
    names = ("results.parquet", "results.csv", "output.jsonl", "errors.jsonl")
    targets = {name: run_dir / name for name in names}
    tmp = {name: path.with_name(f".{path.name}.tmp") for name, path in targets.items()}
    count = 0
    schema = plan.schema
    with (
        pq.ParquetWriter(tmp["results.parquet"], schema, compression="zstd") as parquet,
        tmp["results.csv"].open("wb") as csv_fh,
        tmp["output.jsonl"].open("w", encoding="utf-8") as out_fh,
        tmp["errors.jsonl"].open("w", encoding="utf-8") as err_fh,
    ):
        csv_writer = pacsv.CSVWriter(csv_fh, schema)
        for batch in _rebatch(batches, BATCH_ROWS):
            table = _to_table(batch, plan)
            parquet.write_table(table)  # one row group per batch
            csv_writer.write_table(table)
            count = _write_output_lines(out_fh, err_fh, batch, count, plan)
        if count == 0:
            empty = schema.empty_table()
            parquet.write_table(empty)
            csv_writer.write_table(empty)
        csv_writer.close()
    for name, path in targets.items():
        os.replace(tmp[name], path)
    _memory.release()  # the summary, read next, starts from a low base
    return count
