"""Unit tests for parsl_chat.io.prompts: the three JSONL shapes, .txt, every bad line, scan, streaming."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from parsl_chat.config import LimitsConfig
from parsl_chat.errors import InputError
from parsl_chat.io.prompts import (
    MAX_LINE_BYTES,
    LineProblem,
    Prompt,
    PromptSource,
    iter_prompts,
    scan,
)


def write(tmp_path: Path, text: str | bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(tmp_path: Path, *objs: Any, name: str = "prompts.jsonl") -> Path:
    return write(tmp_path, "".join(json.dumps(o) + "\n" for o in objs), name)


def parse(path: Path, **kw: Any) -> list[Prompt | LineProblem]:
    return list(PromptSource(path, **kw).parse())


def one(tmp_path: Path, line: str) -> Prompt | LineProblem:
    items = parse(write(tmp_path, line + "\n"))
    assert len(items) == 1
    return items[0]


def problem(tmp_path: Path, line: str) -> str:
    item = one(tmp_path, line)
    assert isinstance(item, LineProblem), item
    assert item.line == 1
    return item.message


USER_HI = [{"role": "user", "content": "Hi"}]


# --------------------------------------------------------------------------- the three shapes


def test_prompt_shape(tmp_path: Path) -> None:
    item = one(tmp_path, '{"prompt": "Explain Amdahl\'s law."}')
    assert isinstance(item, Prompt)
    assert item.custom_id == "line-1"
    assert item.line == 1
    assert item.messages == ({"role": "user", "content": "Explain Amdahl's law."},)
    assert item.agent is None and item.conversation is None and item.turn is None and item.model is None
    assert item.params == {}


def test_messages_shape_with_id_agent_params(tmp_path: Path) -> None:
    item = one(
        tmp_path,
        json.dumps({"id": "q7", "messages": USER_HI, "agent": "analyst", "params": {"temperature": 0.1}, "metadata": {"x": 1}}),
    )
    assert isinstance(item, Prompt)
    assert item.custom_id == "q7"
    assert item.messages == tuple(USER_HI)
    assert item.agent == "analyst"
    assert item.params == {"temperature": 0.1}


def test_messages_with_system_and_list_content(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": ""},
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "42"},
    ]
    item = one(tmp_path, json.dumps({"messages": msgs}))
    assert isinstance(item, Prompt)
    assert len(item.messages) == 5


def test_batch_request_shape(tmp_path: Path) -> None:
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": USER_HI, "temperature": 0.3, "max_tokens": 16},
        "params": {"top_p": 0.5, "temperature": 0.9},
    }
    item = one(tmp_path, json.dumps(line))
    assert isinstance(item, Prompt)
    assert item.custom_id == "r1"
    assert item.model == "m"
    assert item.messages == tuple(USER_HI)
    # body params win over top-level params; model and messages are not params
    assert item.params == {"top_p": 0.5, "temperature": 0.3, "max_tokens": 16}


def test_batch_request_alternative_url_and_defaults(tmp_path: Path) -> None:
    a = one(tmp_path, json.dumps({"custom_id": "r", "url": "/chat/completions", "body": {"messages": USER_HI}}))
    assert isinstance(a, Prompt) and a.model is None and a.params == {}
    b = one(tmp_path, json.dumps({"custom_id": "r", "body": {"messages": USER_HI}}))  # method and url optional
    assert isinstance(b, Prompt)


def test_integer_id_becomes_string_and_equal_ids_accepted(tmp_path: Path) -> None:
    a = one(tmp_path, json.dumps({"id": 7, "prompt": "x"}))
    assert isinstance(a, Prompt) and a.custom_id == "7"
    b = one(tmp_path, json.dumps({"id": "z", "custom_id": "z", "prompt": "x"}))
    assert isinstance(b, Prompt) and b.custom_id == "z"


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "first question\n\n   \nsecond {not json}\r\nthird", name="prompts.txt")
    items = parse(path)
    assert all(isinstance(i, Prompt) for i in items)
    prompts = [i for i in items if isinstance(i, Prompt)]
    assert [p.custom_id for p in prompts] == ["line-1", "line-4", "line-5"]
    assert [p.messages[0]["content"] for p in prompts] == ["first question", "second {not json}", "third"]
    assert all(p.messages[0]["role"] == "user" for p in prompts)


def test_txt_suffix_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "x"}\n', name="P.TXT")
    [item] = parse(path)
    assert isinstance(item, Prompt) and item.messages[0]["content"] == '{"prompt": "x"}'


def test_blank_lines_skipped_but_counted(tmp_path: Path) -> None:
    path = write(tmp_path, '\n{"prompt": "a"}\n   \n\t\n{"prompt": "b"}\n\n')
    items = parse(path)
    assert [(i.line, i.custom_id) for i in items if isinstance(i, Prompt)] == [(2, "line-2"), (5, "line-5")]
    assert len(items) == 2


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    items = parse(path)
    assert [i.messages[0]["content"] for i in items if isinstance(i, Prompt)] == ["a", "b"]


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.txt"])
def test_utf8_byte_order_mark_at_the_start_is_not_part_of_the_first_line(tmp_path: Path, name: str) -> None:
    # Windows editors save UTF-8 with a BOM; only the file's first three bytes are one
    body = b'{"prompt": "a"}\r\n{"prompt": "\xef\xbb\xbfb"}\r\n' if name.endswith(".jsonl") else b"a\n\xef\xbb\xbfb\n"
    items = parse(write(tmp_path, b"\xef\xbb\xbf" + body, name=name))
    first, second = items
    assert isinstance(first, Prompt) and first.messages[0]["content"] == "a"
    assert isinstance(second, Prompt) and second.messages[0]["content"] == "\ufeffb"  # inside the text: kept


# --------------------------------------------------------------------------- bad lines


def test_invalid_json(tmp_path: Path) -> None:
    msg = problem(tmp_path, '{"prompt": "x"')
    assert msg.startswith("invalid JSON:")
    assert "column" in msg


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("42", "int"), ("null", "NoneType")])
def test_not_an_object(tmp_path: Path, line: str, kind: str) -> None:
    assert problem(tmp_path, line) == f"expected a JSON object, got {kind}"


def test_unknown_field_lists_valid_fields(tmp_path: Path) -> None:
    msg = problem(tmp_path, '{"prompt": "x", "temperature": 1}')
    assert "unknown field 'temperature'" in msg
    for valid in ("prompt", "messages", "id", "custom_id", "agent", "conversation", "params", "method", "url", "body"):
        assert valid in msg.split("valid fields:")[1]


@pytest.mark.parametrize("value", ['""', '"   "', '"\\n"'])
def test_empty_prompt(tmp_path: Path, value: str) -> None:
    assert problem(tmp_path, '{"prompt": ' + value + "}") == "field 'prompt': empty"


def test_prompt_not_a_string(tmp_path: Path) -> None:
    assert problem(tmp_path, '{"prompt": 5}') == "field 'prompt': expected a string, got int"


def test_bad_role_lists_valid_roles(tmp_path: Path) -> None:
    msg = problem(tmp_path, json.dumps({"messages": [{"role": "human", "content": "x"}]}))
    assert "field 'messages'" in msg
    assert "message 1: unknown role 'human'" in msg
    assert "valid roles: system, developer, user, assistant, tool" in msg


def test_missing_role(tmp_path: Path) -> None:
    assert "unknown role None" in problem(tmp_path, json.dumps({"messages": [{"content": "x"}]}))


@pytest.mark.parametrize("messages", ["hello", {"role": "user", "content": "x"}, None, 3])
def test_messages_not_a_list(tmp_path: Path, messages: Any) -> None:
    assert problem(tmp_path, json.dumps({"messages": messages})) == "field 'messages': expected a non-empty list of messages"


def test_empty_messages(tmp_path: Path) -> None:
    assert problem(tmp_path, '{"messages": []}') == "field 'messages': expected a non-empty list of messages"


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (["hi"], "message 1: expected an object"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "message 2: 'content' must be a string"),
        ([{"role": "user", "content": "  "}], "message 1: empty content"),
        ([{"role": "user", "content": []}], "message 1: empty content"),
        ([{"role": "user"}], "message 1: 'content' must be a string"),
    ],
)
def test_bad_message_content(tmp_path: Path, messages: Any, expected: str) -> None:
    assert expected in problem(tmp_path, json.dumps({"messages": messages}))


def test_batch_wrong_method(tmp_path: Path) -> None:
    msg = problem(tmp_path, json.dumps({"custom_id": "r", "method": "GET", "url": "/v1/chat/completions", "body": {}}))
    assert msg == "field 'method': only POST is supported, got 'GET'"


def test_batch_wrong_url(tmp_path: Path) -> None:
    msg = problem(
        tmp_path, json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/embeddings", "body": {"messages": USER_HI}})
    )
    assert msg == "field 'url': only /v1/chat/completions is supported, got '/v1/embeddings'"


def test_batch_without_custom_id(tmp_path: Path) -> None:
    assert problem(tmp_path, json.dumps({"id": "r", "body": {"messages": USER_HI}})) == "batch request line without 'custom_id'"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("x", "field 'body': expected an object"),
        ({"model": "m"}, "field 'body.messages': missing"),
        ({"messages": USER_HI, "model": 3}, "field 'body.model': expected a string"),
        ({"messages": []}, "field 'body.messages': expected a non-empty list of messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "field 'body.messages': message 1: unknown role 'bot'"),
    ],
)
def test_batch_bad_body(tmp_path: Path, body: Any, expected: str) -> None:
    assert problem(tmp_path, json.dumps({"custom_id": "r", "body": body})).startswith(expected)


@pytest.mark.parametrize(("value", "kind"), [(1.5, "float"), (True, "bool"), (None, "NoneType"), ([1], "list"), ({}, "dict")])
def test_id_type_errors(tmp_path: Path, value: Any, kind: str) -> None:
    assert problem(tmp_path, json.dumps({"id": value, "prompt": "x"})) == f"field 'id': expected a string, got {kind}"
    assert problem(tmp_path, json.dumps({"custom_id": value, "prompt": "x"})) == f"field 'id': expected a string, got {kind}"


def test_empty_id(tmp_path: Path) -> None:
    assert problem(tmp_path, '{"id": "  ", "prompt": "x"}') == "field 'id': empty"


def test_id_and_custom_id_differ(tmp_path: Path) -> None:
    msg = problem(tmp_path, '{"id": "a", "custom_id": "b", "prompt": "x"}')
    assert msg == "both 'id' and 'custom_id' given, with different values"


def test_no_content_field_and_combined_fields(tmp_path: Path) -> None:
    assert problem(tmp_path, '{"id": "a"}') == "no 'prompt', 'messages' or 'body' field"
    msg = problem(tmp_path, json.dumps({"prompt": "x", "messages": USER_HI}))
    assert msg == "fields 'prompt' and 'messages' cannot be combined"


def test_problem_keeps_custom_id(tmp_path: Path) -> None:
    item = one(tmp_path, '{"id": "q1", "prompt": ""}')
    assert isinstance(item, LineProblem) and item.custom_id == "q1"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"params": [1]}, "field 'params': expected an object"),
        ({"agent": ""}, "field 'agent': expected a non-empty string"),
        ({"agent": 3}, "field 'agent': expected a non-empty string"),
        ({"conversation": True}, "field 'conversation': expected a string"),
        ({"conversation": [1]}, "field 'conversation': expected a string"),
    ],
)
def test_bad_optional_fields(tmp_path: Path, extra: dict[str, Any], expected: str) -> None:
    assert problem(tmp_path, json.dumps({"prompt": "x", **extra})) == expected


def test_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "fine"}\n')
    items = parse(path)
    assert isinstance(items[0], Prompt) and isinstance(items[2], Prompt)
    bad = items[1]
    assert isinstance(bad, LineProblem)
    assert bad.line == 2
    assert bad.message == "not valid UTF-8 (byte 16)"
    assert str(bad) == f"{path}:2: not valid UTF-8 (byte 16)"


def test_over_long_line(tmp_path: Path) -> None:
    long_line = json.dumps({"prompt": "x" * 500})
    path = write(tmp_path, '{"prompt": "a"}\n' + long_line + "\n" + '{"prompt": "b"}\n' + long_line)
    items = parse(path, max_line_bytes=100)
    assert [type(i).__name__ for i in items] == ["Prompt", "LineProblem", "Prompt", "LineProblem"]
    assert [i.line for i in items] == [1, 2, 3, 4]
    assert items[1].message.startswith("line is longer than 100 bytes, the limit for one prompt (limits.max_line_mb)")  # type: ignore[union-attr]
    assert items[2].messages[0]["content"] == "b"  # type: ignore[union-attr]


def test_line_length_boundary(tmp_path: Path) -> None:
    exact = '{"prompt": "' + "y" * 86 + '"}'  # 100 bytes, plus the newline
    assert len(exact) == 100
    items = parse(write(tmp_path, exact + "\n" + exact), max_line_bytes=100)
    assert all(isinstance(i, Prompt) for i in items) and len(items) == 2
    items = parse(write(tmp_path, exact + "x\n"), max_line_bytes=100)
    assert isinstance(items[0], LineProblem)


def test_default_max_line_bytes() -> None:
    assert MAX_LINE_BYTES == 64 << 20 == LimitsConfig().max_line_bytes


def test_a_5_mb_line_is_one_prompt_and_carries_its_size(tmp_path: Path) -> None:
    big = json.dumps({"id": "doc", "prompt": "summarise: " + "word " * (1 << 20)})  # 5 MiB and a bit
    items = parse(write(tmp_path, '{"prompt": "small"}\n' + big + "\n"))
    assert all(isinstance(i, Prompt) for i in items)
    small, doc = items
    assert small.line_bytes == 0  # type: ignore[union-attr]
    assert doc.line_bytes == len(big) + 1 > 5 << 20  # type: ignore[union-attr]
    assert Prompt.from_dict(doc.to_dict()) == doc  # type: ignore[union-attr]
    assert doc.digest == dataclasses.replace(doc, line_bytes=0).digest  # type: ignore[arg-type]


def test_empty_file(tmp_path: Path) -> None:
    result = scan(PromptSource(write(tmp_path, "")))
    assert not result.ok
    assert [p.message for p in result.problems] == ["file has no prompts"]
    assert result.problems[0].line == 1


def test_blank_only_file(tmp_path: Path) -> None:
    result = scan(PromptSource(write(tmp_path, "\n   \n\n")))
    assert [p.message for p in result.problems] == ["file has no prompts"]


def test_only_bad_lines_does_not_add_no_prompts(tmp_path: Path) -> None:
    result = scan(PromptSource(write(tmp_path, "nope\n")))
    assert result.problem_count == 1
    assert result.problems[0].message.startswith("invalid JSON")


# --------------------------------------------------------------------------- scan


def test_scan_reports_every_bad_line_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\n".join(
            [
                '{"prompt": "ok"}',
                "broken",
                '{"prompt": ""}',
                '{"id": "a", "prompt": "x"}',
                "[]",
                '{"id": "a", "prompt": "y"}',
            ]
        )
        + "\n",
    )
    result = scan(PromptSource(path))
    assert [p.line for p in result.problems] == [2, 3, 5, 6]
    assert result.problem_count == 4
    assert not result.ok
    assert result.prompts == 3
    assert result.valid == 2
    assert result.duplicate_lines == {6}
    assert result.problems[-1].message == "duplicate id 'a' (first on line 4)"
    assert result.problems[-1].custom_id is None


def test_scan_duplicates_including_default_ids(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"id": "q1", "prompt": "a"},
        {"id": "line-3", "prompt": "b"},  # collides with the default id of line 3
        {"prompt": "c"},
        {"id": "q1", "prompt": "d"},
        {"id": "q1", "prompt": "e"},
    )
    result = scan(PromptSource(path))
    assert result.duplicate_lines == {3, 4, 5}
    assert [str(p) for p in result.problems] == [
        f"{path}:3: duplicate id 'line-3' (first on line 2)",
        f"{path}:4: duplicate id 'q1' (first on line 1)",
        f"{path}:5: duplicate id 'q1' (first on line 1)",
    ]


def test_scan_ok_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"prompt": "a"}, {"id": "b", "messages": USER_HI, "agent": "analyst"}, {"prompt": "c", "agent": "x"})
    result = scan(PromptSource(path))
    assert result.ok
    assert result.problems == []
    assert result.prompts == result.valid == 3
    assert result.pinned_agents == {"analyst": 2, "x": 3}


def test_pinned_agents_first_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"prompt": "a", "agent": "t"}, {"prompt": "b", "agent": "s"}, {"prompt": "c", "agent": "t"})
    assert scan(PromptSource(path)).pinned_agents == {"t": 1, "s": 2}


def test_conversation_turns_and_ends(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"prompt": "a1", "conversation": "a"},
        {"prompt": "b1", "conversation": 5},
        {"prompt": "solo"},
        {"prompt": "a2", "conversation": "a"},
        {"prompt": "bad", "conversation": "a", "agent": ""},  # invalid: not a turn
        {"prompt": "a3", "conversation": "a"},
    )
    items = parse(path)
    turns = [(i.line, i.conversation, i.turn) for i in items if isinstance(i, Prompt)]
    assert turns == [(1, "a", 1), (2, "5", 1), (3, None, None), (4, "a", 2), (6, "a", 3)]
    result = scan(PromptSource(path))
    assert result.conversation_ends == {"a": 6, "5": 2}


def test_conversation_end_skips_duplicate_last_turn(tmp_path: Path) -> None:
    """A duplicate line is skipped by the dispatcher, so it must not be the line that closes its conversation."""
    path = jsonl(
        tmp_path,
        {"id": "t1", "prompt": "x", "conversation": "c"},
        {"id": "t2", "prompt": "y", "conversation": "c"},
        {"id": "t1", "prompt": "z", "conversation": "c"},
        {"id": "only", "prompt": "z", "conversation": "d"},
        {"id": "only", "prompt": "z", "conversation": "e"},
    )
    result = scan(PromptSource(path))
    assert result.duplicate_lines == {3, 5}
    assert result.conversation_ends == {"c": 2, "d": 4}
    # and every line named as an end is one the dispatcher will see
    dispatched = {i.line for i in iter_prompts(PromptSource(path), skip_lines=result.duplicate_lines) if isinstance(i, Prompt)}
    assert set(result.conversation_ends.values()) <= dispatched


def test_turns_restart_per_parse(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"prompt": "a", "conversation": "c"}, {"prompt": "b", "conversation": "c"})
    source = PromptSource(path)
    first = [i.turn for i in source.parse() if isinstance(i, Prompt)]
    second = [i.turn for i in source.parse() if isinstance(i, Prompt)]
    assert first == second == [1, 2]


def test_iter_prompts_skips_lines(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"})
    path.write_text(path.read_text() + "garbage\n")
    items = list(iter_prompts(PromptSource(path), skip_lines={3}))
    assert [(type(i).__name__, i.line) for i in items] == [("Prompt", 1), ("Prompt", 2), ("LineProblem", 3), ("LineProblem", 4)]
    assert items[2].message == "duplicate id"  # type: ignore[union-attr]


def test_scan_keeps_problem_count_beyond_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl_chat.io.prompts as prompts_mod

    monkeypatch.setattr(prompts_mod, "MAX_PROBLEMS_KEPT", 3)
    result = scan(PromptSource(write(tmp_path, "x\n" * 10)))
    assert result.problem_count == 10
    assert len(result.problems) == 3


# --------------------------------------------------------------------------- digest and round trip


def _prompt(**kw: Any) -> Prompt:
    base: dict[str, Any] = {"custom_id": "a", "line": 1, "messages": ({"role": "user", "content": "x"},)}
    base.update(kw)
    return Prompt(**base)


def test_digest_stable_and_independent_of_id_and_line() -> None:
    a = _prompt()
    assert a.digest == _prompt().digest
    assert len(a.digest) == 16 and int(a.digest, 16) >= 0
    assert _prompt(custom_id="other", line=99, turn=3).digest == a.digest
    # params order does not matter
    assert _prompt(params={"a": 1, "b": 2}).digest == _prompt(params={"b": 2, "a": 1}).digest


@pytest.mark.parametrize(
    "change",
    [
        {"messages": ({"role": "user", "content": "y"},)},
        {"messages": ({"role": "system", "content": "x"},)},
        {"params": {"temperature": 0}},
        {"agent": "analyst"},
        {"model": "m"},
        {"conversation": "c"},
    ],
)
def test_digest_detects_changes(change: dict[str, Any]) -> None:
    assert _prompt(**change).digest != _prompt().digest


def test_digest_same_across_reads(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"id": "a", "prompt": "héllo"})
    [first] = parse(path)
    [second] = parse(path)
    assert isinstance(first, Prompt) and isinstance(second, Prompt)
    assert first.digest == second.digest
    jsonl(tmp_path, {"id": "a", "prompt": "hello"})
    [changed] = parse(path)
    assert isinstance(changed, Prompt) and changed.digest != first.digest


def test_to_dict_from_dict_round_trip(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"custom_id": "r", "body": {"model": "m", "messages": USER_HI, "temperature": 0}, "agent": "a", "conversation": "c"},
    )
    [item] = parse(path)
    assert isinstance(item, Prompt)
    data = json.loads(json.dumps(item.to_dict()))
    back = Prompt.from_dict(data)
    assert back == item
    assert back.digest == item.digest


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such prompts file"):
        PromptSource(tmp_path / "absent.jsonl")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        PromptSource(tmp_path)


def test_input_error_exit_code(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        PromptSource(tmp_path / "nope.txt")
    assert info.value.exit_code == 2


def test_repr(tmp_path: Path) -> None:
    path = write(tmp_path, '{"prompt": "x"}\n')
    assert repr(PromptSource(path)) == f"PromptSource({str(path)!r})"


def _write_big(path: Path, lines: int, filler_bytes: int, duplicate: str | None = None) -> None:
    filler = "z" * filler_bytes
    with path.open("w", encoding="utf-8") as fh:
        for start in range(0, lines, 10_000):
            fh.write("".join(f'{{"id":"q{i}","prompt":"{filler} {i}"}}\n' for i in range(start, min(lines, start + 10_000))))
        if duplicate is not None:
            fh.write(f'{{"id":"{duplicate}","prompt":"{filler} again"}}\n')  # forces scan's second pass


def test_scan_memory_is_bounded_tracemalloc(tmp_path: Path) -> None:
    """tracemalloc peak while scanning a 30 MB file: holding the file, or one object per line, would exceed it."""
    path = tmp_path / "big.jsonl"
    _write_big(path, 3_000, 10_000, duplicate="q3")
    assert path.stat().st_size > 30_000_000
    source = PromptSource(path)
    tracemalloc.start()
    try:
        result = scan(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.prompts == 3_001
    assert result.duplicate_lines == {3_001}
    assert result.problems[0].message == "duplicate id 'q3' (first on line 4)"
    assert peak < 10_000_000, f"scan peaked at {peak / 1e6:.1f} MB"


_RSS_PROBE = """
import sys
from parsl_chat.io.prompts import PromptSource, scan

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

source = PromptSource(sys.argv[1])
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak to the current RSS
except OSError:
    pass
before = max(status("VmRSS"), status("VmHWM"))
result = scan(source)
print(result.prompts, sorted(result.duplicate_lines), status("VmHWM") - before)
"""


def test_scan_200k_lines_memory_is_bounded(tmp_path: Path) -> None:
    """200k lines in a fresh process: the peak RSS grows by a few MB during scan.

    (tracemalloc over 200k lines would take ~20 s; the growth of the peak RSS (VmHWM) measures the same thing cheaply.
    One Prompt object per line would grow it by more than 100 MB; a dict of every id in the duplicate pass, ~20 MB.)
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the peak RSS")
    path = tmp_path / "big200k.jsonl"
    _write_big(path, 200_000, 10, duplicate="q17")
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True, check=True, timeout=120)
    grown = int(out.stdout.split()[-1])
    assert out.stdout.startswith("200001 [200001] "), out.stdout
    assert grown < 15_000_000, f"scan grew the peak RSS by {grown / 1e6:.1f} MB"


# --------------------------------------------------------------------------- structured output

_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "label", "schema": {"type": "object", "properties": {"label": {"type": "string"}}}},
}


def test_bad_response_format_names_its_field(tmp_path: Path) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    message = problem(tmp_path, json.dumps({"prompt": "hi", "params": {"response_format": bad}}))
    assert message.startswith("field 'params.response_format': 'json_schema.schema': not a valid JSON Schema")
    batch = {"custom_id": "r1", "body": {"messages": USER_HI, "response_format": {"type": "yaml"}}}
    assert problem(tmp_path, json.dumps(batch)).startswith("field 'body.response_format': 'type' must be")


def test_scan_collects_the_prompts_schema_properties(tmp_path: Path) -> None:
    other = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"properties": {"n": {"type": "integer"}}}}}
    path = jsonl(
        tmp_path,
        {"prompt": "a", "params": {"response_format": _FORMAT}},
        {"custom_id": "b", "body": {"messages": USER_HI, "response_format": other}},
        {"prompt": "c"},
    )
    result = scan(PromptSource(path))
    assert result.ok and result.property_types == {"label": "string", "n": "integer"}
