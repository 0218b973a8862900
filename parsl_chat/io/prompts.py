"""Reading prompts files: JSON Lines (three shapes) or plain text, streamed.

A prompts file is read twice: :func:`scan` checks every line (and finds
duplicate ids with a few bytes per line, not one Python object per prompt),
then :func:`iter_prompts` streams the valid prompts to the dispatcher.
Nothing here holds the whole file in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.structured import check_response_format, merge_property_types, property_types
from ..errors import InputError
from .ledger import id_hash  # the ledger's: a resume finds prompts by the same hash

__all__ = [
    "BIG_LINE_BYTES",
    "MAX_LINE_BYTES",
    "LineProblem",
    "Prompt",
    "PromptSource",
    "ScanResult",
    "iter_prompts",
    "scan",
    "spool_stdin",
]

#: 64 MiB (``limits.max_line_mb``): a long document, or a vision request with base64 images,
#: is one line; one line is all that is read at a time, so memory stays flat past it
MAX_LINE_BYTES = 64 << 20
#: lines above this size carry their size (``Prompt.line_bytes``), so chunks can be kept small in bytes
BIG_LINE_BYTES = 64 << 10
ROLES = ("system", "developer", "user", "assistant", "tool")
TOP_LEVEL_KEYS = ("prompt", "messages", "id", "custom_id", "agent", "conversation", "params", "method", "url", "body", "metadata")
BATCH_URLS = ("/v1/chat/completions", "/chat/completions")
MAX_PROBLEMS_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request to send: the user's messages plus routing hints."""

    custom_id: str
    line: int
    messages: tuple[dict[str, Any], ...]
    agent: str | None = None
    conversation: str | None = None
    turn: int | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    line_bytes: int = 0  # the line's size when over BIG_LINE_BYTES, else 0

    @property
    def digest(self) -> str:
        """Content hash: a resumed run refuses a prompt whose text changed."""
        canon = json.dumps(
            [self.messages, self.params, self.agent, self.model, self.conversation],
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.blake2b(canon.encode(), digest_size=8).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        record = {
            "custom_id": self.custom_id,
            "line": self.line,
            "messages": list(self.messages),
            "agent": self.agent,
            "conversation": self.conversation,
            "turn": self.turn,
            "model": self.model,
            "params": self.params,
        }
        if self.line_bytes:
            record["line_bytes"] = self.line_bytes
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prompt:
        return cls(
            custom_id=data["custom_id"],
            line=data["line"],
            messages=tuple(data["messages"]),
            agent=data.get("agent"),
            conversation=data.get("conversation"),
            turn=data.get("turn"),
            model=data.get("model"),
            params=data.get("params") or {},
            line_bytes=data.get("line_bytes") or 0,
        )


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A line that cannot become a prompt."""

    path: str
    line: int
    message: str
    custom_id: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class PromptSource:
    """A prompts file on disk (``.jsonl``/``.json`` lines, or ``.txt`` one prompt per line)."""

    def __init__(self, path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.text_format = self.path.suffix.lower() == ".txt"
        if not self.path.exists():
            raise InputError(f"{self.path}: no such prompts file")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a prompts file")
        try:
            with self.path.open("rb"):
                pass
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read: {exc.strerror}") from None

    def __repr__(self) -> str:
        return f"PromptSource({str(self.path)!r})"

    def _raw_lines(self) -> Iterator[tuple[int, bytes | None]]:
        """Yield (line number, bytes); None for a line over the size limit."""
        limit = self.max_line_bytes
        with self.path.open("rb") as fh:
            lineno = 0
            while True:
                raw = fh.readline(limit + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > limit and not raw.endswith(b"\n"):
                    while True:  # skip the rest of the oversized line without holding it
                        rest = fh.readline(limit)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield lineno, None
                    continue
                yield lineno, raw

    def parse(self) -> Iterator[Prompt | LineProblem]:
        """Every non-blank line as a Prompt or a LineProblem (duplicates are not checked here)."""
        where = str(self.path)
        turns: dict[str, int] = {}
        for lineno, raw in self._raw_lines():
            if raw is None:
                yield LineProblem(where, lineno, _too_long(self.max_line_bytes))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield LineProblem(where, lineno, f"not valid UTF-8 (byte {exc.start + 1})")
                continue
            text = text.rstrip("\r\n")
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte order mark (Windows editors write one), not part of the prompt
            if not text.strip():
                continue
            if self.text_format:
                yield Prompt(custom_id=f"line-{lineno}", line=lineno, messages=({"role": "user", "content": text},))
                continue
            item = _parse_json_line(where, lineno, text)
            if isinstance(item, Prompt) and item.conversation is not None:
                turn = turns.get(item.conversation, 0) + 1
                turns[item.conversation] = turn
                item = _with_turn(item, turn)
            if isinstance(item, Prompt) and len(raw) > BIG_LINE_BYTES:
                item = dataclasses.replace(item, line_bytes=len(raw))
            yield item


def _too_long(limit: int) -> str:
    size = f"{limit / (1 << 20):g} MiB" if limit >= 1 << 20 else f"{limit} bytes"
    return (
        f"line is longer than {size}, the limit for one prompt (limits.max_line_mb); "
        "raise it in a --config file (limits: {max_line_mb: N}) or with PARSL_CHAT_LIMITS_MAX_LINE_MB=N"
    )


def _with_turn(prompt: Prompt, turn: int) -> Prompt:
    return dataclasses.replace(prompt, turn=turn)


class _BadLine(Exception):
    """One problem of a prompts line, with the prompt's id once it is known."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.custom_id = custom_id


def _parse_json_line(where: str, lineno: int, text: str) -> Prompt | LineProblem:
    """One line's prompt, or its first problem (checked in the order the messages are documented)."""
    try:
        obj = _json_object(text)
        custom_id = _custom_id(obj, lineno)
        messages, model, params = _request(obj, custom_id)
        agent, conversation = _routing_fields(obj, custom_id)
    except _BadLine as bad:
        return LineProblem(where, lineno, bad.message, bad.custom_id)
    return Prompt(
        custom_id=custom_id,
        line=lineno,
        messages=tuple(messages),
        agent=agent,
        conversation=conversation,
        model=model,
        params=params,
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise _BadLine(f"unknown field {unknown[0]!r}; valid fields: {', '.join(TOP_LEVEL_KEYS)}")
    return obj


def _custom_id(obj: dict[str, Any], lineno: int) -> str:
    """``custom_id`` or ``id`` (the same if both), else ``line-N``."""
    ids = [obj[k] for k in ("custom_id", "id") if k in obj]
    if len(ids) == 2 and ids[0] != ids[1]:
        raise _BadLine("both 'id' and 'custom_id' given, with different values")
    if not ids:
        return f"line-{lineno}"
    raw_id = ids[0]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise _BadLine(f"field 'id': expected a string, got {type(raw_id).__name__}")
    if not str(raw_id).strip():
        raise _BadLine("field 'id': empty")
    return str(raw_id)


def _request(obj: dict[str, Any], custom_id: str) -> tuple[list[Any], str | None, dict[str, Any]]:
    """(messages, model, params) from exactly one of ``prompt``, ``messages`` or a batch ``body``."""
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise _BadLine("field 'params': expected an object", custom_id)
    params = dict(params)
    model = None
    shapes = [k for k in ("prompt", "messages", "body") if k in obj]
    if not shapes:
        raise _BadLine("no 'prompt', 'messages' or 'body' field", custom_id)
    if len(shapes) > 1:
        raise _BadLine(f"fields {' and '.join(repr(s) for s in shapes)} cannot be combined", custom_id)
    if "prompt" in obj:
        messages = _prompt_messages(obj["prompt"], custom_id)
    elif "messages" in obj:
        messages = obj["messages"]
    else:
        messages, model = _batch_body(obj, custom_id, params)
    bad = _check_messages(messages)
    if bad:
        raise _BadLine(f"field '{'body.messages' if 'body' in obj else 'messages'}': {bad}", custom_id)
    if "response_format" in params:
        bad = check_response_format(params["response_format"])
        if bad:
            in_body = isinstance(obj.get("body"), dict) and "response_format" in obj["body"]
            raise _BadLine(f"field '{'body' if in_body else 'params'}.response_format': {bad}", custom_id)
    return messages, model, params


def _prompt_messages(text_prompt: Any, custom_id: str) -> list[Any]:
    if not isinstance(text_prompt, str):
        raise _BadLine(f"field 'prompt': expected a string, got {type(text_prompt).__name__}", custom_id)
    if not text_prompt.strip():
        raise _BadLine("field 'prompt': empty", custom_id)
    return [{"role": "user", "content": text_prompt}]


def _batch_body(obj: dict[str, Any], custom_id: str, params: dict[str, Any]) -> tuple[Any, str | None]:
    """An OpenAI Batch API line: its messages and model; the body's other keys go into ``params``."""
    if "custom_id" not in obj:
        raise _BadLine("batch request line without 'custom_id'")
    if obj.get("method", "POST") != "POST":
        raise _BadLine(f"field 'method': only POST is supported, got {obj.get('method')!r}", custom_id)
    if obj.get("url", BATCH_URLS[0]) not in BATCH_URLS:
        raise _BadLine(f"field 'url': only {BATCH_URLS[0]} is supported, got {obj.get('url')!r}", custom_id)
    body = obj["body"]
    if not isinstance(body, dict):
        raise _BadLine("field 'body': expected an object", custom_id)
    if "messages" not in body:
        raise _BadLine("field 'body.messages': missing", custom_id)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _BadLine("field 'body.model': expected a string", custom_id)
    params.update({k: v for k, v in body.items() if k not in ("messages", "model")})
    return body["messages"], model


def _routing_fields(obj: dict[str, Any], custom_id: str) -> tuple[str | None, str | None]:
    """The optional ``agent`` and ``conversation`` of a line."""
    agent = obj.get("agent")
    if agent is not None and (not isinstance(agent, str) or not agent):
        raise _BadLine("field 'agent': expected a non-empty string", custom_id)
    conversation = obj.get("conversation")
    if conversation is None:
        return agent, None
    if isinstance(conversation, bool) or not isinstance(conversation, (str, int)):
        raise _BadLine("field 'conversation': expected a string", custom_id)
    return agent, str(conversation)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"message {i + 1}: expected an object"
        role = msg.get("role")
        if role not in ROLES:
            return f"message {i + 1}: unknown role {role!r}; valid roles: {', '.join(ROLES)}"
        content = msg.get("content")
        if isinstance(content, list):
            if not content:
                return f"message {i + 1}: empty content"
        elif not isinstance(content, str):
            return f"message {i + 1}: 'content' must be a string"
        elif not content.strip() and role == "user":
            return f"message {i + 1}: empty content"
    return None


@dataclass
class ScanResult:
    """What a full check of a prompts file found."""

    path: str
    prompts: int = 0
    problems: list[LineProblem] = field(default_factory=list)
    problem_count: int = 0
    #: Lines whose id repeats an earlier line's (the later line is the bad one).
    duplicate_lines: set[int] = field(default_factory=set)
    #: conversation id -> line of its last turn, so the dispatcher can release it early.
    conversation_ends: dict[str, int] = field(default_factory=dict)
    #: agent name -> first line pinning a prompt to it, checked against the fleet before sending
    pinned_agents: dict[str, int] = field(default_factory=dict)
    #: top-level property -> column type of the prompts' own schemas (``output.flatten``)
    property_types: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def valid(self) -> int:
        return self.prompts - len(self.duplicate_lines)

    def add(self, problem: LineProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)


def scan(source: PromptSource) -> ScanResult:
    """Check every line; collect problems, duplicate ids and conversation ends."""
    result = ScanResult(path=str(source.path))
    hashes = array("Q")
    lines = array("Q")
    for item in source.parse():
        if isinstance(item, LineProblem):
            result.add(item)
            continue
        result.prompts += 1
        hashes.append(id_hash(item.custom_id))
        lines.append(item.line)
        if item.conversation is not None:
            result.conversation_ends[item.conversation] = item.line
        if item.agent is not None:
            result.pinned_agents.setdefault(item.agent, item.line)
        if "response_format" in item.params:
            merge_property_types(result.property_types, property_types(item.params["response_format"]))
    if len(hashes) > 1:
        dup_lines = _duplicate_lines(np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(lines, dtype=np.uint64))
        if dup_lines:
            first_seen: dict[str, int] = {}
            dup_set = set(dup_lines)
            # a skipped duplicate must not be a conversation's last turn, or that conversation is never dispatched
            conversation_ends: dict[str, int] = {}
            for item in source.parse():  # second look only to name the ids involved
                if isinstance(item, LineProblem):
                    continue
                if item.line in dup_set:  # only colliding ids are remembered: memory stays small
                    first = first_seen.get(item.custom_id)
                    if first is not None:
                        result.duplicate_lines.add(item.line)
                        result.add(
                            LineProblem(result.path, item.line, f"duplicate id {item.custom_id!r} (first on line {first})")
                        )
                        continue
                    first_seen.setdefault(item.custom_id, item.line)
                if item.conversation is not None:
                    conversation_ends[item.conversation] = item.line
            result.conversation_ends = conversation_ends
    result.problems.sort(key=lambda p: p.line)
    if result.prompts == 0 and result.problem_count == 0:
        result.add(LineProblem(result.path, 1, "file has no prompts"))
    return result


def _duplicate_lines(hashes: np.ndarray, lines: np.ndarray) -> list[int]:
    """Lines whose id hash occurs more than once (all occurrences; the caller names the later ones)."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return []
    mask = np.zeros(len(ordered), dtype=bool)
    mask[1:] |= same
    mask[:-1] |= same
    return sorted(int(x) for x in lines[order[mask]])


def iter_prompts(source: PromptSource, *, skip_lines: set[int] | frozenset[int] = frozenset()) -> Iterator[Prompt | LineProblem]:
    """Stream what :func:`scan` found valid; bad lines come as LineProblem so the caller can record them."""
    for item in source.parse():
        if isinstance(item, Prompt) and item.line in skip_lines:
            yield LineProblem(str(source.path), item.line, "duplicate id", None)
            continue
        yield item


def spool_stdin(folder: Path) -> Path:
    """Copy standard input into ``folder`` so it can be read twice (and resumed).

    The file is named ``prompts.jsonl`` when the input starts with a JSON object,
    else ``prompts.txt`` (one prompt per line).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".stdin.tmp"
    first = b""
    with tmp.open("wb") as out:
        while chunk := sys.stdin.buffer.read(1 << 16):
            if not first.strip():
                first += chunk[:4096]
            out.write(chunk)
    dest = folder / ("prompts.jsonl" if first.lstrip().startswith(b"{") else "prompts.txt")
    tmp.replace(dest)
    return dest
