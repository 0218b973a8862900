"""Unit tests for parsl_chat.io.results: Parquet, CSV and OpenAI Batch output written from the ledger."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parsl_chat.io.ledger import Ledger
from parsl_chat.io.results import COLUMNS, SCHEMA, batch_error_line, batch_output_line, write_results
from parsl_chat.io.rows import LedgerRow, Row
from parsl_chat.worker.executor import iso

SPEC_COLUMNS = [
    "custom_id",
    "line",
    "agent",
    "model",
    "endpoint",
    "hostname",
    "node",
    "worker",
    "block",
    "job_id",
    "conversation",
    "turn",
    "status",
    "error_type",
    "error",
    "attempts",
    "submitted_at",
    "started_at",
    "finished_at",
    "queue_s",
    "latency_s",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "response",
]
#: columns parsl-chat adds after the original list (docs/interfaces.md): structured output's, the response
#: cache's, the model server's timings
EXTRA_COLUMNS = [
    "parsed", "cached", "cached_from", "cached_at", "cached_latency_s",
    "server_queue_s", "server_prompt_s", "server_generation_s",
]  # fmt: skip
ALL_COLUMNS = SPEC_COLUMNS + EXTRA_COLUMNS
RUN_FILES = ["errors.jsonl", "ledger.jsonl", "output.jsonl", "results.csv", "results.parquet"]

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()


def test_the_row_type_has_one_key_per_result_column() -> None:
    """Row (io/rows.py) and SCHEMA are the same columns: a column added to one is added to the other."""
    assert Row.__required_keys__ | Row.__optional_keys__ == set(COLUMNS)
    assert LedgerRow.__optional_keys__ - Row.__optional_keys__ == {"digest"}


def row(custom_id: str, line: int, status: str = "ok", **over: Any) -> dict[str, Any]:
    """A ledger record as the executor writes it (extra keys such as digest included)."""
    ok = status == "ok"
    base: dict[str, Any] = {
        "custom_id": custom_id,
        "line": line,
        "agent": "analyst",
        "model": "m",
        "endpoint": "http://node1:8000/v1",
        "hostname": "node1",
        "node": "node1",
        "worker": "w0",
        "block": "0",
        "job_id": "123",
        "conversation": None,
        "turn": None,
        "status": status,
        "error_type": None if ok else "server_error",
        "error": None if ok else "HTTP 500: boom",
        "attempts": 1 if ok else 4,
        "submitted_at": iso(T0 + line),
        "started_at": iso(T0 + line + 0.25),
        "finished_at": iso(T0 + line + 1.5),
        "queue_s": 0.25,
        "latency_s": 1.25,
        "prompt_tokens": 10 if ok else None,
        "completion_tokens": 5 if ok else None,
        "finish_reason": "stop" if ok else None,
        "response": f"answer {custom_id}" if ok else None,
        "server_queue_s": 0.5 if ok else None,
        "server_prompt_s": 0.05 if ok else None,
        "server_generation_s": 0.7 if ok else None,
        "digest": "00000000000000ab",
    }
    base.update(over)
    return base


def make_run(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    with Ledger(run_dir / "ledger.jsonl") as ledger:
        ledger.append(rows)
    return run_dir


def read_output(run_dir: Path, name: str = "output.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text(encoding="utf-8").splitlines()]


def test_schema_is_the_spec_then_extensions() -> None:
    assert list(COLUMNS) == ALL_COLUMNS
    assert SCHEMA.field("submitted_at").type == pa.timestamp("us", tz="UTC")


def test_runfactory_schema_agrees() -> None:
    import runfactory  # tests/ is on sys.path: conftest.py lives there

    assert runfactory.SCHEMA.equals(SCHEMA)


def test_write_results_files(tmp_path: Path) -> None:
    rows = [
        row("a", 1),
        row("b", 2, "error"),
        row("c", 3, conversation="conv", turn=1, response='quote " comma , newline \n end'),
    ]
    run_dir = make_run(tmp_path, rows)
    assert write_results(run_dir) == 3
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FILES

    table = pq.read_table(run_dir / "results.parquet")
    assert table.schema.names == ALL_COLUMNS
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == 3
    data = table.to_pylist()
    assert [r["custom_id"] for r in data] == ["a", "b", "c"]
    first = data[0]
    for key in SPEC_COLUMNS:
        if not key.endswith("_at"):
            assert first[key] == rows[0].get(key), key  # a field the ledger row lacks (the cache's) reads as empty
    assert first["started_at"] == datetime.fromtimestamp(T0 + 1.25, tz=timezone.utc)
    assert first["started_at"].utcoffset().total_seconds() == 0
    assert data[1]["status"] == "error" and data[1]["error_type"] == "server_error" and data[1]["prompt_tokens"] is None
    assert data[2]["turn"] == 1 and data[2]["response"] == rows[2]["response"]
    assert "digest" not in table.schema.names

    with (run_dir / "results.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == ALL_COLUMNS
    assert [r[0] for r in body] == ["a", "b", "c"]
    assert body[2][SPEC_COLUMNS.index("response")] == rows[2]["response"]
    assert body[0][SPEC_COLUMNS.index("started_at")].startswith("2024-05-01 12:00:01.25")


def test_last_ledger_record_wins(tmp_path: Path) -> None:
    rows = [
        row("a", 1, "error"),
        row("b", 2),
        row("a", 1, "error", attempts=3),
        row("c", 3),
        row("a", 1, "ok", attempts=2, response="finally"),
        row("c", 3, "error"),
    ]
    run_dir = make_run(tmp_path, rows)
    assert write_results(run_dir) == 3
    data = pq.read_table(run_dir / "results.parquet").to_pylist()
    by_id = {r["custom_id"]: r for r in data}
    assert len(data) == 3 and set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["status"] == "ok" and by_id["a"]["response"] == "finally" and by_id["a"]["attempts"] == 2
    assert by_id["c"]["status"] == "error"
    assert sorted(o["custom_id"] for o in read_output(run_dir)) == ["a", "b"]
    assert [o["custom_id"] for o in read_output(run_dir, "errors.jsonl")] == ["c"]


def test_superseded_records_are_all_but_the_last_of_each_id() -> None:
    import numpy as np

    from parsl_chat.io.results import _superseded

    assert _superseded(np.array([5, 1, 5, 2, 5, 1], dtype=np.uint64)).tolist() == [True, True, True, False, False, False]
    assert _superseded(np.array([3, 1, 2], dtype=np.uint64)) is None  # every id once: nothing to drop
    assert _superseded(np.zeros(0, dtype=np.uint64)) is None


def test_order_follows_last_record(tmp_path: Path) -> None:
    rows = [row("a", 1), row("b", 2), row("a", 1, attempts=2)]
    run_dir = make_run(tmp_path, rows)
    write_results(run_dir)
    assert [r["custom_id"] for r in pq.read_table(run_dir / "results.parquet").to_pylist()] == ["b", "a"]


def test_timestamps_are_utc_from_any_offset(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [row("a", 1, finished_at="2024-05-01T14:00:00.500000+02:00", started_at=None)])
    write_results(run_dir)
    [data] = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert data["finished_at"] == datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)
    assert data["started_at"] is None


def test_missing_keys_become_nulls(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [{"custom_id": "x", "line": 4, "status": "error", "error_type": "invalid_input"}])
    assert write_results(run_dir) == 1
    [data] = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert data["custom_id"] == "x" and data["line"] == 4
    assert all(data[k] is None for k in SPEC_COLUMNS if k not in ("custom_id", "line", "status", "error_type"))


def test_empty_ledger(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [])
    assert write_results(run_dir) == 0
    table = pq.read_table(run_dir / "results.parquet")
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)
    assert (run_dir / "results.csv").read_text().splitlines() == [",".join(f'"{c}"' for c in ALL_COLUMNS)]
    assert (run_dir / "output.jsonl").read_text() == ""
    assert (run_dir / "errors.jsonl").read_text() == ""


def test_missing_ledger(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert write_results(run_dir) == 0
    assert pq.read_table(run_dir / "results.parquet").num_rows == 0


def test_atomic_no_temp_files_and_rewrite(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [row("a", 1)])
    write_results(run_dir)
    with Ledger(run_dir / "ledger.jsonl") as ledger:
        ledger.append([row("b", 2)])
    assert write_results(run_dir) == 2  # rewritten in place from the whole ledger
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == RUN_FILES
    assert not any(n.endswith(".tmp") or n.startswith(".") for n in names)
    assert pq.read_table(run_dir / "results.parquet").num_rows == 2


def test_failure_leaves_previous_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing never replaces a good results file with a partial one."""
    import parsl_chat.io.results as results_mod

    run_dir = make_run(tmp_path, [row("a", 1)])
    write_results(run_dir)
    before = (run_dir / "results.parquet").read_bytes()
    with Ledger(run_dir / "ledger.jsonl") as ledger:
        ledger.append([row("b", 2)])

    def boom(*args: Any) -> pa.Table:
        raise RuntimeError("disk full")

    monkeypatch.setattr(results_mod, "_to_table", boom)
    with pytest.raises(RuntimeError):
        write_results(run_dir)
    assert (run_dir / "results.parquet").read_bytes() == before


def test_many_rows_span_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl_chat.io.results as results_mod

    monkeypatch.setattr(results_mod, "BATCH_ROWS", 7)
    rows = [row(f"q{i}", i + 1) for i in range(50)] + [row("q3", 4, response="redo")]
    run_dir = make_run(tmp_path, rows)
    assert write_results(run_dir) == 50
    table = pq.read_table(run_dir / "results.parquet")
    assert table.num_rows == 50
    assert table.column("custom_id").to_pylist()[-1] == "q3"
    with (run_dir / "results.csv").open(newline="") as fh:
        assert len(list(csv.reader(fh))) == 51
    out = read_output(run_dir)
    assert [o["id"] for o in out] == [f"batch_req_{n:08d}" for n in range(1, 51)]


def test_output_jsonl_answers_and_errors_jsonl_failures(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [row("a", 1), row("b", 2, "error")])
    write_results(run_dir)
    [ok] = read_output(run_dir)
    [err] = read_output(run_dir, "errors.jsonl")
    assert set(ok) == {"id", "custom_id", "response", "error"}
    assert ok["id"] == "batch_req_00000001" and ok["custom_id"] == "a" and ok["error"] is None
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["request_id"] == "req_00000001"
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["created"] == int(T0 + 2.5)
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "answer a"}, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    # an HTTP error is the endpoint's answer, as OpenAI's error file has it (openai/openai-openapi#302)
    assert err == {
        "id": "batch_req_00000002",
        "custom_id": "b",
        "response": {
            "status_code": 500,
            "request_id": "req_00000002",
            "body": {"error": {"message": "boom", "type": "server_error", "param": None, "code": "server_error"}},
        },
        "error": None,
    }


def test_errors_in_output_keeps_the_old_output_jsonl(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, [row("a", 1), row("b", 2, "error")])
    (run_dir / "run.json").write_text(json.dumps({"output": {"errors_in_output": True}}))
    write_results(run_dir)
    ok, err = read_output(run_dir)
    assert ok["custom_id"] == "a" and ok["response"]["status_code"] == 200
    assert err == {
        "id": "batch_req_00000002",
        "custom_id": "b",
        "response": None,
        "error": {"code": "server_error", "message": "HTTP 500: boom"},
    }
    assert [line["custom_id"] for line in read_output(run_dir, "errors.jsonl")] == ["b"]


@pytest.mark.parametrize(
    ("error_type", "error", "status", "openai_type"),
    [
        ("rate_limit", "HTTP 429: slow down", 429, "requests"),
        ("bad_request", "HTTP 400: no such model", 400, "invalid_request_error"),
        ("auth", "HTTP 401: Incorrect API key provided", 401, "invalid_request_error"),
    ],
)
def test_error_line_with_an_http_answer(error_type: str, error: str, status: int, openai_type: str) -> None:
    line = batch_error_line({"custom_id": "x", "status": "error", "error_type": error_type, "error": error}, 3)
    assert line["error"] is None
    assert line["response"]["status_code"] == status
    assert line["response"]["body"]["error"] == {
        "message": error.split(": ", 1)[1],
        "type": openai_type,
        "param": None,
        "code": error_type,
    }


@pytest.mark.parametrize(
    ("error_type", "error"),
    [
        ("timeout", "no answer within 120 s"),
        ("connection", "ClientConnectorError: refused"),
        ("invalid_output", "3 answer(s) did not match the schema; last: 'label' is a required property (at $)"),
        ("invalid_input", "line 4: field 'prompt': empty"),
    ],
)
def test_error_line_without_an_http_answer(error_type: str, error: str) -> None:
    line = batch_error_line({"custom_id": "x", "status": "error", "error_type": error_type, "error": error}, 9)
    assert line == {
        "id": "batch_req_00000009",
        "custom_id": "x",
        "response": None,
        "error": {"code": error_type, "message": error},
    }


def test_batch_output_line_defaults() -> None:
    line = batch_output_line({"custom_id": "x", "status": "error"}, 12)
    assert line == {"id": "batch_req_00000012", "custom_id": "x", "response": None, "error": {"code": "other", "message": ""}}
    ok = batch_output_line({"custom_id": "y", "status": "ok", "response": "r"}, 1)
    assert ok["response"]["body"]["usage"]["total_tokens"] == 0
    assert ok["response"]["body"]["created"] is None


def test_output_readable_by_openai_types(tmp_path: Path) -> None:
    openai_types = pytest.importorskip("openai.types.chat")
    run_dir = make_run(tmp_path, [row("a", 1)])
    write_results(run_dir)
    [ok] = read_output(run_dir)
    completion = openai_types.ChatCompletion.model_validate(ok["response"]["body"])
    assert completion.choices[0].message.content == "answer a"
    assert completion.created == int(T0 + 2.5)


def test_arrow_and_tolerant_readers_write_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl_chat.io.results as results_mod

    rows = [row(f"q{i}", i + 1, "error" if i % 5 == 0 else "ok", turn=i % 3 or None) for i in range(40)]
    rows.append(row("q7", 8, response="again"))  # a retry: the last record wins
    (tmp_path / "clean").mkdir()
    (tmp_path / "tolerant").mkdir()
    clean = make_run(tmp_path / "clean", rows)
    tolerant = make_run(tmp_path / "tolerant", rows)

    def no_python(path: Path) -> Any:
        raise AssertionError("a clean ledger is read by Arrow")

    monkeypatch.setattr(results_mod, "_python_batches", no_python)
    assert write_results(clean) == 40
    monkeypatch.undo()
    monkeypatch.setattr(results_mod, "_ledger_is_clean", lambda path: False)
    assert write_results(tolerant) == 40
    for name in ("results.parquet", "results.csv", "output.jsonl", "errors.jsonl"):
        if name == "results.parquet":
            assert pq.read_table(clean / name).equals(pq.read_table(tolerant / name))
        else:
            assert (clean / name).read_bytes() == (tolerant / name).read_bytes(), name


@pytest.mark.parametrize("damage", ["garbled middle line", "torn last line"])
def test_damaged_ledger_falls_back_to_the_tolerant_reader(tmp_path: Path, damage: str) -> None:
    run_dir = make_run(tmp_path, [row("a", 1), row("b", 2), row("c", 3)])
    ledger = run_dir / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    if damage == "garbled middle line":
        lines[1] = '{"custom_id": "b", "line": 2, "status": \n'
    else:
        lines[2] = lines[2][:25]  # no newline: the write that was cut
    ledger.write_text("".join(lines))
    assert write_results(run_dir) == 2
    assert pq.read_table(run_dir / "results.parquet").column("custom_id").to_pylist() == (
        ["a", "c"] if damage == "garbled middle line" else ["a", "b"]
    )


def _flatten_run(tmp_path: Path, types: dict[str, str], parsed: list[Any]) -> Path:
    rows = [row(f"q{n}", n + 1, parsed=None if p is None else json.dumps(p)) for n, p in enumerate(parsed)]
    rows.append(row("bad", len(rows) + 1, "error", error_type="invalid_output", error="not JSON"))
    run_dir = make_run(tmp_path, rows)
    (run_dir / "run.json").write_text(json.dumps({"output": {"flatten": True, "property_types": types}}))
    return run_dir


def test_flatten_gives_a_typed_column_per_property(tmp_path: Path) -> None:
    types = {"label": "string", "score": "integer", "p": "number", "sure": "boolean", "tags": "json", "model": "string"}
    parsed = [
        {"label": "pos", "score": 3, "p": 0.5, "sure": True, "tags": ["a", "b"], "model": "x"},
        {"label": "neg", "score": 2.0, "p": 1, "sure": False, "tags": [], "model": "y"},
        {"label": "pos"},  # optional properties left out: nulls
    ]
    run_dir = _flatten_run(tmp_path, types, parsed)
    assert write_results(run_dir) == 4
    table = pq.read_table(run_dir / "results.parquet")
    assert table.schema.names == [*ALL_COLUMNS, "label", "score", "p", "sure", "tags", "parsed_model"]
    assert table.schema.field("score").type == pa.int64() and table.schema.field("p").type == pa.float64()
    assert table.schema.field("sure").type == pa.bool_() and table.schema.field("tags").type == pa.string()
    assert table.column("label").to_pylist() == ["pos", "neg", "pos", None]
    assert table.column("score").to_pylist() == [3, 2, None, None]
    assert table.column("p").to_pylist() == [0.5, 1.0, None, None]
    assert table.column("sure").to_pylist() == [True, False, None, None]
    assert [None if t is None else json.loads(t) for t in table.column("tags").to_pylist()] == [["a", "b"], [], None, None]
    assert table.column("parsed_model").to_pylist() == ["x", "y", None, None]
    assert table.column("model").to_pylist() == ["m"] * 4  # the results column is not shadowed
    df = table.to_pandas()
    assert df.groupby("label").size().to_dict() == {"neg": 1, "pos": 2}
    with (run_dir / "results.csv").open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[-6:] == ["label", "score", "p", "sure", "tags", "parsed_model"]


def test_no_flatten_without_the_flag(tmp_path: Path) -> None:
    run_dir = _flatten_run(tmp_path, {"label": "string"}, [{"label": "pos"}])
    (run_dir / "run.json").write_text(json.dumps({"output": {"flatten": False, "property_types": {"label": "string"}}}))
    write_results(run_dir)
    table = pq.read_table(run_dir / "results.parquet")
    assert table.schema.names == ALL_COLUMNS
    assert json.loads(table.column("parsed").to_pylist()[0]) == {"label": "pos"}


def test_flatten_value_that_misfits_its_column(tmp_path: Path) -> None:
    """A prompt with a schema of its own can answer another type: text columns keep it as JSON, others null."""
    run_dir = _flatten_run(tmp_path, {"label": "string", "score": "integer"}, [{"label": 7, "score": "high"}])
    write_results(run_dir)
    table = pq.read_table(run_dir / "results.parquet")
    assert table.column("label").to_pylist()[0] == "7" and table.column("score").to_pylist()[0] is None
