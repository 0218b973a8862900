"""Structured output: answers that must be JSON matching a JSON Schema.

A schema reaches a request in one of three places, the most specific winning:
a prompt's ``params.response_format``, an agent's (``params.response_format``
or ``schema: file.json`` in the config), or the run's ``schema: file.json``.
``response_format`` is spelled as the OpenAI API spells it
(``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``, or
``{"type": "json_object"}``), and is sent to the endpoint as it is.

On the worker every answer to such a request is parsed and validated with the
``jsonschema`` package; an answer that does not validate is asked for again
(``limits.max_invalid_retries``) and then becomes an ``invalid_output`` error
row carrying the validator's message. A valid answer lands in the ``parsed``
column as JSON text; with ``output.flatten`` each top-level property also gets
a typed column of its own (:func:`property_types`).

``jsonschema`` is imported when a schema is first used: a run without one
never pays for it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .agents import Outcome

__all__ = [
    "FLAT_TYPES",
    "Expectation",
    "check_answer",
    "check_response_format",
    "expectation_for",
    "flat_column_names",
    "load_schema_file",
    "merge_property_types",
    "property_types",
    "until_valid",
]

#: what a flattened column can hold; ``json`` is JSON text (objects, arrays, mixed types)
FLAT_TYPES = ("string", "integer", "number", "boolean", "json")
#: OpenAI's rule for ``json_schema.name``
_NAME_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MESSAGE_CHARS = 300


# --------------------------------------------------------------------------- checking schemas


def _schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a JSON Schema the validator accepts, or None."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        return f"a JSON Schema must be an object, got {type(schema).__name__}"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message} (at {exc.json_path})"
    return None


@functools.lru_cache(maxsize=256)
def _format_problem(canonical: str) -> str | None:
    """:func:`check_response_format` on canonical JSON: a million lines sharing one schema check it once."""
    value = json.loads(canonical)
    if not isinstance(value, dict):
        return f"expected an object, got {type(value).__name__}"
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        return f"'type' must be 'json_schema', 'json_object' or 'text', got {kind!r}"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        return "'json_schema' must be an object with 'name' and 'schema'"
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME_OK.match(name):
        return f"'json_schema.name' must be 1-64 letters, digits, '_' or '-', got {name!r}"
    if "strict" in spec and not isinstance(spec["strict"], bool):
        return f"'json_schema.strict' must be true or false, got {spec['strict']!r}"
    if "schema" not in spec:
        return "'json_schema.schema' is missing"
    problem = _schema_problem(spec["schema"])
    return f"'json_schema.schema': {problem}" if problem else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def check_response_format(value: Any) -> str | None:
    """What is wrong with a ``response_format`` value (OpenAI's spelling), or None when it is fine."""
    try:
        canonical = _canonical(value)
    except (TypeError, ValueError) as exc:
        return f"not JSON data: {exc}"
    return _format_problem(canonical)


def load_schema_file(path: Path, named_by: str) -> dict[str, Any]:
    """The ``response_format`` a schema file stands for.

    The file holds a JSON Schema, or OpenAI's ``json_schema`` object
    (``{"name", "schema", "strict"}``); a bare schema is named after the file.
    ``named_by`` is where the config names the file (``file:line``), for errors.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{named_by}: schema file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{named_by}: cannot read schema file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno}); named by {named_by}") from None
    if isinstance(data, dict) and "schema" in data and "name" in data:
        spec = data  # "name" and "schema" are not JSON Schema keywords: this is OpenAI's wrapper
    else:
        spec = {"name": re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "schema", "schema": data}
    response_format = {"type": "json_schema", "json_schema": spec}
    problem = check_response_format(response_format)
    if problem:
        raise ConfigError(f"{path}: {problem}; named by {named_by}")
    return response_format


# --------------------------------------------------------------------------- checking answers


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What every answer to a request must be: a JSON object, matching ``schema`` when there is one."""

    schema: dict[str, Any] | None
    validator: Any  # a jsonschema validator, or None for json_object

    def problem(self, value: Any) -> str | None:
        if self.validator is None:
            return None if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"
        from jsonschema.exceptions import best_match

        error = best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        return f"{error.message} (at {error.json_path})"


@functools.lru_cache(maxsize=256)
def _expectation(canonical: str) -> Expectation | None:
    from jsonschema.validators import validator_for

    value = json.loads(canonical)
    if value.get("type") == "json_object":
        return Expectation(None, None)
    if value.get("type") != "json_schema":
        return None  # "text": free text, nothing to check
    schema = value["json_schema"]["schema"]
    return Expectation(schema, validator_for(schema)(schema))


def expectation_for(agent_params: Mapping[str, Any], prompt_params: Mapping[str, Any] | None) -> Expectation | None:
    """The check for a request's answers: the prompt's ``response_format`` wins over the agent's (as in the body sent)."""
    response_format = (prompt_params or {}).get("response_format", agent_params.get("response_format"))
    if not isinstance(response_format, dict):
        return None
    return _expectation(_canonical(response_format))


def check_answer(text: str | None, expectation: Expectation) -> tuple[str | None, str | None]:
    """``(parsed JSON text, None)`` for a valid answer, ``(None, what is wrong)`` otherwise."""
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    problem = expectation.problem(value)
    if problem:
        return None, problem
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")), None


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


async def until_valid(
    ask: Callable[[], Awaitable[Outcome]],
    expectation: Expectation | None,
    max_invalid_retries: int,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Ask until an answer validates, at most ``max_invalid_retries`` times more; returns the final Outcome.

    Every answer paid for counts: attempts and tokens add up over the asks, and
    the first ask's start is the row's. Anything but an ok answer (an error, a
    stopped run) is returned as it is. An ask again that ``should_stop`` prevents
    leaves the prompt unfinished, as a retry a stop prevents does (agents.UNFINISHED).
    """
    outcome = await ask()
    if expectation is None:
        return outcome
    invalid = 0
    while outcome.status == "ok":
        parsed, problem = check_answer(outcome.response, expectation)
        if problem is None:
            outcome.parsed = parsed
            return outcome
        invalid += 1
        if invalid > max_invalid_retries:
            return _invalid(outcome, invalid, problem)
        if should_stop is not None and should_stop():
            return _unfinished(outcome, invalid, problem)
        previous, outcome = outcome, await ask()
        outcome.attempts += previous.attempts
        outcome.started_at = previous.started_at
        outcome.prompt_tokens = _add(previous.prompt_tokens, outcome.prompt_tokens)
        outcome.completion_tokens = _add(previous.completion_tokens, outcome.completion_tokens)
    return outcome


def _unfinished(outcome: Outcome, answers: int, problem: str) -> Outcome:
    from .agents import UNFINISHED  # agents imports this module

    outcome.status = UNFINISHED
    outcome.error_type = "invalid_output"
    outcome.error = f"stopped before asking again: {answers} answer(s) did not match the schema; last: {problem}"[:_MESSAGE_CHARS]
    return outcome


def _invalid(outcome: Outcome, answers: int, problem: str) -> Outcome:
    cut = " (cut off at max_tokens)" if outcome.finish_reason == "length" else ""
    # the last answer stays in 'response': what the model said is what a user debugs with
    outcome.status = "error"
    outcome.error_type = "invalid_output"
    outcome.error = f"{answers} answer(s) did not match the schema; last{cut}: {problem}"[:_MESSAGE_CHARS]
    return outcome


# --------------------------------------------------------------------------- flattening


def _flat_type(prop: Any) -> str:
    """The column type of one top-level property's schema."""
    if not isinstance(prop, dict):
        return "json"
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None:
        values = prop.get("enum", [prop["const"]] if "const" in prop else None)
        if isinstance(values, list) and values:
            found = {_value_type(v) for v in values if v is not None}
            kind = found.pop() if len(found) == 1 else None
    return kind if kind in ("string", "integer", "number", "boolean") else "json"


def _value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "json"


def property_types(response_format: Any) -> dict[str, str]:
    """Top-level property -> column type (one of :data:`FLAT_TYPES`) of a ``json_schema`` response format."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return {}
    schema = (response_format.get("json_schema") or {}).get("schema")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {str(name): _flat_type(prop) for name, prop in properties.items()}


def merge_property_types(into: dict[str, str], more: Mapping[str, str]) -> None:
    """Union of two schemas' columns; a property typed differently by them holds JSON text."""
    for name, kind in more.items():
        into[name] = kind if into.get(name, kind) == kind else "json"


def flat_column_names(types: Mapping[str, str], taken: set[str]) -> dict[str, str]:
    """Property -> column name: the property's own name unless a results column has it (then ``parsed_<name>``)."""
    names: dict[str, str] = {}
    used = set(taken)
    for prop in types:
        name = prop if prop not in used else f"parsed_{prop}"
        while name in used:
            name = f"parsed_{name}"
        names[prop] = name
        used.add(name)
    return names


def output_meta(
    flatten: bool, errors_in_output: bool, agent_params: list[dict[str, Any]], prompt_types: Mapping[str, str]
) -> dict[str, Any]:
    """run.json's ``output``: how results.py writes the files, with the flattened columns' types.

    The columns are the union of every schema the run can use: the agents' (the
    run's schema is in each agent's params by now) and the prompts' own.
    """
    types: dict[str, str] = {}
    if flatten:
        for params in agent_params:
            merge_property_types(types, property_types(params.get("response_format")))
        merge_property_types(types, prompt_types)
    return {"flatten": flatten, "errors_in_output": errors_in_output, "property_types": types}
