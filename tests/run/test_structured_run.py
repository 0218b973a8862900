"""Structured output end to end: ``parsl-chat run`` with JSON Schemas against the simulated endpoint.

The simulated server answers a request with a ``response_format`` with JSON that
matches the schema; ``__invalid_json_<n>__`` / ``__wrong_schema_<n>__`` in a
prompt spoil its first n answers (parsl_chat.serve.simulated).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from parsl_chat.io.results import COLUMNS

LABEL_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "sarcastic": {"type": "boolean"},
        "aspects": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["label", "confidence", "stars", "sarcastic", "aspects"],
    "additionalProperties": False,
}


def _setup(tmp_path: Path, prompts: list[dict[str, Any]], config: str | None = None) -> tuple[Path, Path]:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "label.json").write_text(json.dumps(LABEL_SCHEMA, indent=2))
    cfg = tmp_path / "config.yaml"
    # the schema path is relative to the config file, not to where the run starts
    cfg.write_text(config or "schema: schemas/label.json\nagents:\n  - name: labeller\n  - name: second\n")
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return cfg, path


def _attempts_per_prompt(server: Any) -> dict[str, int]:
    return dict(collections.Counter(r["prompt"] for r in server.requests()))


def test_schema_valid_retried_and_invalid_with_flattened_columns(sim_server, tmp_path: Path) -> None:
    """On Parsl workers: valid answers, answers valid on the third ask, and answers that never validate."""
    server = sim_server(latency_ms=5)
    prompts = [
        {"id": "good", "prompt": "The battery lasts for days"},
        {"id": "good2", "prompt": "Shipping was slow"},
        {"id": "retried", "prompt": "Screen is fine __invalid_json_2__"},
        {"id": "mismatch", "prompt": "Great, it broke __wrong_schema_1__"},
        {"id": "hopeless", "prompt": "No idea __invalid_json_9__"},
    ]
    cfg, path = _setup(tmp_path, prompts)
    out = tmp_path / "run"
    args = ["run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(out), "--flatten"]
    # without warm start every row comes from a Parsl worker: validation runs there
    result = run_cli(*args, "--max-failures", "1", env={"PARSL_CHAT_WARM_START": "0"}, cwd=tmp_path / "schemas")
    assert result.returncode == 0, result.stderr

    table = pq.read_table(out / "results.parquet")
    flat = ["label", "confidence", "stars", "sarcastic", "aspects"]
    assert table.schema.names == [*COLUMNS, *flat]
    assert [str(table.schema.field(c).type) for c in flat] == ["string", "double", "int64", "bool", "string"]
    df = table.to_pandas().set_index("custom_id")
    assert df.block.notna().all()  # Parsl's workers answered

    ok = df[df.status == "ok"]
    assert sorted(ok.index) == ["good", "good2", "mismatch", "retried"]
    for cid, row in ok.iterrows():
        parsed = json.loads(row.parsed)
        assert parsed == json.loads(row.response), cid
        assert row.label == parsed["label"] and row.stars == parsed["stars"] and row.sarcastic == parsed["sarcastic"]
        assert json.loads(row.aspects) == parsed["aspects"]
    assert df.loc[["good", "good2"], "attempts"].tolist() == [1, 1]
    assert df.loc["retried", "attempts"] == 3 and df.loc["mismatch", "attempts"] == 2
    # tokens of every answer paid for are counted
    assert df.loc["retried", "completion_tokens"] > df.loc["good", "completion_tokens"]
    assert ok.groupby("label").size().sum() == 4  # df.groupby("label") works at once

    hopeless = df.loc["hopeless"]
    assert hopeless.status == "error" and hopeless.error_type == "invalid_output"
    assert hopeless.attempts == 3  # the first ask and limits.max_invalid_retries (2) more
    assert hopeless.error.startswith("3 answer(s) did not match the schema; last: not JSON (Expecting value")
    assert pd.isna(hopeless.parsed) and pd.isna(hopeless.label)
    assert hopeless.response.startswith("Sure!")  # the last answer is kept to look at

    asked = _attempts_per_prompt(server)
    assert asked[prompts[2]["prompt"]] == 3 and asked[prompts[3]["prompt"]] == 2 and asked[prompts[4]["prompt"]] == 3
    assert asked[prompts[0]["prompt"]] == 1
    # the schema went out as OpenAI spells it (the server answered JSON because of it)
    # and output.jsonl / errors.jsonl split as the Batch API does
    output = [json.loads(line) for line in (out / "output.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in output) == ["good", "good2", "mismatch", "retried"]
    assert errors == [
        {
            "id": errors[0]["id"],
            "custom_id": "hopeless",
            "response": None,
            "error": {"code": "invalid_output", "message": hopeless.error},
        }
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["errors_by_type"] == {"invalid_output": 1}
    # the invalid-output rate per agent and model, in summary.json and the report
    structured = {r["agent"]: r for r in summary["structured"]}
    assert set(structured) == {"labeller", "second"}
    assert sum(r["answers"] for r in structured.values()) == 5
    hopeless_agent = structured[df.loc["hopeless", "agent"]]
    assert hopeless_agent["invalid_output"] == 1
    assert hopeless_agent["invalid_output_rate"] == 1 / hopeless_agent["answers"]
    report = run_cli("report", str(out))
    assert report.returncode == 0, report.stderr
    assert "Structured output" in report.stdout and "invalid_output" in report.stdout
    assert "<h2>Structured output</h2>" in (out / "report.html").read_text()


def test_always_invalid_fails_the_run_with_the_validators_message(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    cfg, path = _setup(tmp_path, [{"id": "a", "prompt": "x __wrong_schema_9__"}, {"id": "b", "prompt": "fine"}])
    out = tmp_path / "run"
    result = run_cli(
        "run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(out), "--no-parsl",
        env={"PARSL_CHAT_LIMITS_MAX_INVALID_RETRIES": "0"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "1 of 2 prompts failed (invalid_output: 1)" in result.stderr
    assert "invalid_output: 1 answer(s) did not match the schema; last: ['not', 'an', 'object'] is not of type 'object'" in (
        result.stderr
    )
    df = pd.read_parquet(out / "results.parquet").set_index("custom_id")
    assert df.loc["a", "attempts"] == 1  # no retries allowed
    assert "label" not in df.columns  # not flattened unless asked


def test_per_prompt_and_per_agent_schemas(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    city = {
        "type": "json_schema",
        "json_schema": {
            "name": "city",
            "schema": {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}},
        },
    }
    prompts = [
        {"id": "free", "prompt": "say hi", "agent": "chatty"},
        {"id": "own", "prompt": "Paris", "agent": "chatty", "params": {"response_format": city}},
        {
            "id": "batch",
            "custom_id": "batch",
            "body": {"messages": [{"role": "user", "content": "Rome"}], "response_format": city},
        },
        {"id": "agent", "prompt": "It is great", "agent": "labeller"},
        {"id": "text", "prompt": "Not JSON please", "agent": "labeller", "params": {"response_format": {"type": "text"}}},
    ]
    prompts[2].pop("id")
    config = "agents:\n  - name: labeller\n    schema: schemas/label.json\n  - name: chatty\n"
    cfg, path = _setup(tmp_path, prompts, config)
    out = tmp_path / "run"
    result = run_cli(
        "run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(out), "--no-parsl", "--flatten"
    )
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet").set_index("custom_id")
    assert (df.status == "ok").all()
    assert pd.isna(df.loc["free", "parsed"]) and df.loc["free", "response"].startswith("sim")
    assert pd.isna(df.loc["text", "parsed"])  # the prompt's own "text" wins over its agent's schema
    assert json.loads(df.loc["own", "parsed"]) == {"city": "Paris", "population": 1}
    assert df.loc["batch", "city"] == "Rome" and df.loc["batch", "population"] == 1
    assert df.loc["agent", "label"] in ("positive", "negative", "neutral") and pd.isna(df.loc["agent", "city"])
    assert str(pq.read_schema(out / "results.parquet").field("population").type) == "int64"
    assert list(df.columns[len(COLUMNS) - 1 :]) == ["label", "confidence", "stars", "sarcastic", "aspects", "city", "population"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "routing: round_robin\nschema: schemas/nope.json\n",
            "config.yaml:2: schema file {dir}/schemas/nope.json does not exist",
        ),
        ("schema: schemas/broken.json\n", "schemas/broken.json:3: invalid JSON: Expecting property name"),
    ],
)
def test_bad_schema_file_exit_2_and_nothing_sent(sim_server, tmp_path: Path, config: str, expected: str) -> None:
    server = sim_server()
    cfg, path = _setup(tmp_path, [{"prompt": "hi"}], config)
    (tmp_path / "schemas" / "broken.json").write_text('{\n  "type": "object",\n  "properties": {,}\n}\n')
    result = run_cli("run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected.format(dir=tmp_path) in result.stderr
    assert server.requests() == []


def test_bad_response_format_in_a_prompt_exit_2(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    cfg, path = _setup(tmp_path, [{"prompt": "hi"}, {"prompt": "there", "params": {"response_format": bad}}])
    result = run_cli("run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"{path}:2: field 'params.response_format': 'json_schema.schema': not a valid JSON Schema" in result.stderr
    assert server.requests() == []


def test_the_readme_example_runs(sim_server, tmp_path: Path) -> None:
    """examples/structured.yaml with its schema and reviews, as the README runs it (simulated endpoint)."""
    from conftest import EXAMPLES

    server = sim_server()
    out = tmp_path / "run"
    result = run_cli(
        "run", str(EXAMPLES / "reviews.jsonl"), "--config", str(EXAMPLES / "structured.yaml"), "--flatten",
        "--endpoint", server.url, "--out", str(out), "--no-parsl",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out / "results.parquet")
    assert table.schema.names[len(COLUMNS) :] == ["sentiment", "stars", "about"]
    assert str(table.schema.field("stars").type) == "int64"
    df = table.to_pandas()
    assert len(df) == 12 and (df.status == "ok").all() and set(df.stars) <= {1, 2, 3, 4, 5}


def test_a_cache_hit_lands_parsed_and_flattened_as_the_answer_did(sim_server, tmp_path: Path) -> None:
    """A re-run from the response cache sends nothing and fills 'parsed' and the flat columns the same."""
    server = sim_server()
    prompts = [{"id": f"r{i}", "prompt": f"review number {i}"} for i in range(12)]
    # temperature 0: only such answers are cached unless the user asks for sampled ones too
    agents = "agents:\n  - name: labeller\n    params: {temperature: 0}\n"
    cfg, path = _setup(tmp_path, prompts, "schema: schemas/label.json\n" + agents)
    store = tmp_path / "cache"
    runs = {}
    for name in ("first", "again"):
        out = tmp_path / name
        args = ["run", str(path), "--config", str(cfg), "--endpoint", server.url, "--out", str(out), "--flatten"]
        result = run_cli(*args, "--cache", str(store), "--no-parsl")
        assert result.returncode == 0, result.stderr
        runs[name] = pd.read_parquet(out / "results.parquet").set_index("custom_id").sort_index()
    assert len(server.requests()) == len(prompts)  # the second run sent nothing
    first, again = runs["first"], runs["again"]
    assert again.cached.all() and not first.cached.any()
    for column in ("parsed", "label", "confidence", "stars", "sarcastic", "aspects"):
        assert again[column].tolist() == first[column].tolist(), column
    assert again.parsed.notna().all()
