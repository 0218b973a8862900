"""Unit tests for parsl_chat.core.structured: schemas, answer checks, asking again, column types."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from parsl_chat.core.agents import Outcome
from parsl_chat.core.structured import (
    check_answer,
    check_response_format,
    expectation_for,
    flat_column_names,
    load_schema_file,
    merge_property_types,
    output_meta,
    property_types,
    until_valid,
)
from parsl_chat.errors import ConfigError

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["pos", "neg"]}, "score": {"type": "integer"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}
LABEL_FORMAT = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True}}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (LABEL_FORMAT, None),
        ({"type": "json_object"}, None),
        ({"type": "text"}, None),
        ("json", "expected an object"),
        ({"type": "xml"}, "'type' must be 'json_schema', 'json_object' or 'text'"),
        ({"type": "json_schema"}, "'json_schema' must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": LABEL_SCHEMA}}, "'json_schema.name' must be"),
        ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "'json_schema.name' must be"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "'json_schema.schema' is missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "'json_schema.strict'"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "not a valid JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be an object, got list"),
    ],
)
def test_check_response_format(value: Any, problem: str | None) -> None:
    found = check_response_format(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_schema_file_bare_or_openai_wrapper(tmp_path: Path) -> None:
    bare = tmp_path / "my label.json"
    bare.write_text(json.dumps(LABEL_SCHEMA))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps(LABEL_FORMAT["json_schema"]))
    assert load_schema_file(bare, "c.yaml:3") == {
        "type": "json_schema",
        "json_schema": {"name": "my_label", "schema": LABEL_SCHEMA},
    }
    assert load_schema_file(wrapped, "c.yaml:3") == LABEL_FORMAT


def test_schema_file_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^c\.yaml:3: schema file .*missing\.json does not exist"):
        load_schema_file(tmp_path / "missing.json", "c.yaml:3")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "type": "object",\n  "properties": {,}\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json:3: invalid JSON: .*named by c\.yaml:3"):
        load_schema_file(broken, "c.yaml:3")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": "objekt"}')
    with pytest.raises(ConfigError, match=r"wrong\.json: 'json_schema.schema': not a valid JSON Schema.*at \$\.type"):
        load_schema_file(wrong, "c.yaml:3")


def test_prompt_response_format_wins_over_the_agent() -> None:
    agent = {"response_format": LABEL_FORMAT}
    assert expectation_for(agent, None) is not None
    assert expectation_for(agent, {"response_format": {"type": "text"}}) is None
    assert expectation_for({}, None) is None
    assert expectation_for({}, {"response_format": {"type": "json_object"}}) is not None


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ('{"label": "pos", "score": 3}', None),
        ('{"label": "meh", "score": 3}', "'meh' is not one of ['pos', 'neg'] (at $.label)"),
        ('{"label": "pos"}', "'score' is a required property (at $)"),
        ('{"label": "pos", "score": 3', "not JSON ("),
        ("Sure! Here is the JSON", "not JSON (Expecting value at line 1 column 1)"),
        ("", "not JSON ("),
    ],
)
def test_check_answer(answer: str, problem: str | None) -> None:
    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    assert expectation is not None
    parsed, found = check_answer(answer, expectation)
    if problem is None:
        assert found is None and json.loads(parsed or "") == json.loads(answer)
    else:
        assert parsed is None and found is not None and found.startswith(problem)


def test_json_object_needs_an_object() -> None:
    expectation = expectation_for({}, {"response_format": {"type": "json_object"}})
    assert expectation is not None
    assert check_answer('{"a": 1}', expectation) == ('{"a":1}', None)
    assert check_answer("[1]", expectation) == (None, "expected a JSON object, got list")


def _outcome(response: str, tokens: int = 5, status: str = "ok", start: float = 100.0) -> Outcome:
    return Outcome(
        status=status,
        attempts=1,
        started_at=start,
        finished_at=start + 1,
        response=response if status == "ok" else None,
        finish_reason="stop" if status == "ok" else None,
        prompt_tokens=10 if status == "ok" else None,
        completion_tokens=tokens if status == "ok" else None,
        error_type=None if status == "ok" else "server_error",
        error=None if status == "ok" else "HTTP 500: boom",
    )


def _asker(outcomes: list[Outcome]) -> tuple[Any, list[int]]:
    asked = [0]

    async def ask() -> Outcome:
        asked[0] += 1
        return outcomes.pop(0)

    return ask, asked


def test_until_valid_asks_again_and_adds_up() -> None:
    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    ask, asked = _asker([_outcome("nope", start=100.0), _outcome('{"label": "neg", "score": 1}', tokens=7, start=102.0)])
    outcome = asyncio.run(until_valid(ask, expectation, 2))
    assert asked[0] == 2
    assert outcome.status == "ok" and json.loads(outcome.parsed or "") == {"label": "neg", "score": 1}
    assert outcome.attempts == 2 and outcome.started_at == 100.0 and outcome.finished_at == 103.0
    assert outcome.prompt_tokens == 20 and outcome.completion_tokens == 12


def test_until_valid_gives_up_with_invalid_output() -> None:
    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    ask, asked = _asker([_outcome("nope") for _ in range(3)])
    outcome = asyncio.run(until_valid(ask, expectation, 2))
    assert asked[0] == 3
    assert outcome.status == "error" and outcome.error_type == "invalid_output"
    assert outcome.error == "3 answer(s) did not match the schema; last: not JSON (Expecting value at line 1 column 1)"
    assert outcome.response == "nope" and outcome.parsed is None and outcome.attempts == 3


def test_until_valid_zero_retries_and_no_schema() -> None:
    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    ask, asked = _asker([_outcome("nope"), _outcome("never asked")])
    assert asyncio.run(until_valid(ask, expectation, 0)).error_type == "invalid_output"
    assert asked[0] == 1
    ask, asked = _asker([_outcome("free text")])
    outcome = asyncio.run(until_valid(ask, None, 2))
    assert outcome.status == "ok" and outcome.parsed is None and asked[0] == 1


def test_until_valid_returns_a_failed_ask_as_it_is() -> None:
    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    ask, asked = _asker([_outcome("nope"), _outcome("", status="error")])
    outcome = asyncio.run(until_valid(ask, expectation, 2))
    assert asked[0] == 2 and outcome.error_type == "server_error" and outcome.attempts == 2


def test_property_types() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string"},
            "n": {"type": "integer"},
            "p": {"type": ["number", "null"]},
            "ok": {"type": "boolean"},
            "level": {"enum": ["low", "high"]},
            "either": {"type": ["string", "integer"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object"},
            "anything": {},
        },
    }
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert property_types(rf) == {
        "label": "string",
        "n": "integer",
        "p": "number",
        "ok": "boolean",
        "level": "string",
        "either": "json",
        "tags": "json",
        "where": "json",
        "anything": "json",
    }
    assert property_types({"type": "json_object"}) == {} and property_types(None) == {}


def test_merged_types_and_column_names() -> None:
    types = {"label": "string", "n": "integer"}
    merge_property_types(types, {"n": "number", "extra": "boolean", "label": "string"})
    assert types == {"label": "string", "n": "json", "extra": "boolean"}
    assert flat_column_names({"label": "string", "status": "string"}, {"status", "model"}) == {
        "label": "label",
        "status": "parsed_status",
    }


def test_output_meta_unites_agents_and_prompts() -> None:
    meta = output_meta(True, False, [{"response_format": LABEL_FORMAT}, {}], {"extra": "number"})
    assert meta == {
        "flatten": True,
        "errors_in_output": False,
        "property_types": {"label": "string", "score": "integer", "extra": "number"},
    }
    assert output_meta(False, True, [{"response_format": LABEL_FORMAT}], {})["property_types"] == {}


def test_until_valid_leaves_the_prompt_unfinished_when_a_stop_prevents_asking_again() -> None:
    """The seams rule: an ask again that a stop prevents is not a failure; the resume sends the prompt."""
    from parsl_chat.core.agents import UNFINISHED

    expectation = expectation_for({"response_format": LABEL_FORMAT}, None)
    ask, asked = _asker([_outcome("nope"), _outcome('{"label": "neg", "score": 1}')])
    outcome = asyncio.run(until_valid(ask, expectation, 2, should_stop=lambda: True))
    assert asked[0] == 1 and outcome.status == UNFINISHED
    assert outcome.error is not None and outcome.error.startswith("stopped before asking again: 1 answer(s)")
    ask, asked = _asker([_outcome("nope"), _outcome('{"label": "neg", "score": 1}')])
    assert asyncio.run(until_valid(ask, expectation, 2, should_stop=lambda: False)).status == "ok"
