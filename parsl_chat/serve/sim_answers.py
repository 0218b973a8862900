"""The simulated endpoint's answers: deterministic words, or JSON matching the asked schema; whole or streamed."""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

from aiohttp import web

from .faults import FaultPlan

__all__ = ["answer_response", "dumps", "message_text"]

_ANSWER_PROMPT_WORDS = 8


def message_text(content: Any) -> str:
    """Text of a message ``content``: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _answer_words(plan: FaultPlan, body: dict[str, Any], prompt: str, spoil: str | None) -> list[str]:
    structured = _structured_text(body.get("response_format"), prompt)
    if spoil is not None:
        return spoil.split(" ")
    if structured is not None:
        return structured.split(" ")  # joined again with spaces: the JSON comes back as it was
    words = ["sim", *prompt.split()[:_ANSWER_PROMPT_WORDS]] + ["tok"] * plan.completion_tokens
    return words[: plan.completion_tokens]


def answer_response(
    plan: FaultPlan,
    cid: str,
    body: dict[str, Any],
    messages: list[dict[str, Any]],
    prompt: str,
    model: str,
    max_tokens: int | None,
    spoil: str | None,
) -> tuple[web.Response, int, int]:
    """The 200 answer, with the prompt and completion tokens it counts."""
    words = _answer_words(plan, body, prompt, spoil)
    finish_reason = "stop"
    if max_tokens is not None and max_tokens < len(words):
        words = words[:max_tokens]
        finish_reason = "length"
    prompt_tokens = sum(len(message_text(m.get("content")).split()) for m in messages)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}
    head = {"id": cid, "created": int(time.time()), "model": model, "system_fingerprint": "fp_simulated"}
    if body.get("stream"):
        response = _stream(head, body, words, finish_reason, usage)
    else:
        response = _completion(head, words, finish_reason, usage)
    return response, prompt_tokens, len(words)


def _completion(head: dict[str, Any], words: list[str], finish_reason: str, usage: dict[str, int]) -> web.Response:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": " ".join(words)},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    completion = {**head, "choices": [choice], "usage": usage}
    completion = {"id": head["id"], "object": "chat.completion", **completion}
    return web.Response(body=dumps(completion), content_type="application/json")


def _stream(
    head: dict[str, Any], body: dict[str, Any], words: list[str], finish_reason: str, usage: dict[str, int]
) -> web.Response:
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    head = {"id": head["id"], "object": "chat.completion.chunk", **head}
    if include_usage:
        head["usage"] = None  # as OpenAI: null on every chunk but the last

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + dumps({**head, "choices": [choice]}) + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": word if i == 0 else " " + word}) for i, word in enumerate(words)]
    parts.append(chunk({}, finish_reason))
    if include_usage:
        parts.append(b"data: " + dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    # No per-token delay is simulated, so one write is as good as many and cheaper.
    return web.Response(body=b"".join(parts), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _structured_text(response_format: Any, prompt: str) -> str | None:
    """A JSON answer for ``response_format``, or None for free text."""
    if not isinstance(response_format, dict):
        return None
    words = prompt.split()[:_ANSWER_PROMPT_WORDS] or ["sim"]
    if response_format.get("type") == "json_object":
        return json.dumps({"answer": " ".join(["sim", *words])})
    spec = response_format.get("json_schema")
    if response_format.get("type") != "json_schema" or not isinstance(spec, dict):
        return None
    schema = spec.get("schema")
    return json.dumps(_Sampler(schema, words).value(schema))


class _Sampler:
    """A value matching a JSON Schema, made from the prompt's words (the same prompt, the same value).

    Covers what extraction schemas use: types, properties, items, enum/const,
    min/max bounds and lengths, anyOf/oneOf/allOf (the first branch) and local
    ``$ref``s. A schema beyond that (patterns, formats) may get a value it rejects,
    which a test sees as invalid output.
    """

    def __init__(self, root: Any, words: list[str]) -> None:
        self.root = root
        self.words = words
        self.seed = zlib.crc32(" ".join(words).encode())

    def value(self, schema: Any, depth: int = 0) -> Any:
        if not isinstance(schema, dict) or depth > 8:
            return None
        if isinstance(schema.get("$ref"), str):
            return self.value(self._ref(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self.seed % len(schema["enum"])]
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.value(schema[key][0], depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "string"
        return self._typed(kind, schema, depth)

    def _typed(self, kind: str, schema: dict[str, Any], depth: int) -> Any:
        if kind == "object":
            props = schema.get("properties")
            return {name: self.value(sub, depth + 1) for name, sub in props.items()} if isinstance(props, dict) else {}
        if kind == "array":
            return [self.value(schema.get("items"), depth + 1) for _ in range(max(1, int(schema.get("minItems", 1))))]
        if kind in ("integer", "number"):
            low, high = schema.get("minimum", 0), schema.get("maximum", 100)
            number = min(max(len(self.words), low), high)
            return int(number) if kind == "integer" else float(number)
        if kind == "boolean":
            return self.seed % 2 == 0
        if kind == "null":
            return None
        text = " ".join(self.words)
        text = text.ljust(int(schema.get("minLength", 0)), "x")
        return text[: int(schema["maxLength"])] if "maxLength" in schema else text

    def _ref(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None  # another document: not fetched
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            node = node.get(part) if isinstance(node, dict) else None
        return node
