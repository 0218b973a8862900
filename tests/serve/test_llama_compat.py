"""Unit tests for parsl_chat.serve.llama_compat: OpenAI's json_schema in front of llama-cpp-python's server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from parsl_chat.serve.llama_compat import OpenAIResponseFormat, rewrite_body

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def test_rewrite_json_schema_to_llama_spelling() -> None:
    body = {
        "model": "m",
        "messages": [],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    }
    rewritten = json.loads(rewrite_body(json.dumps(body).encode()))
    assert rewritten["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert rewritten["messages"] == [] and rewritten["model"] == "m"


def test_other_bodies_pass_unchanged() -> None:
    for raw in (
        b"not json",
        b"[1, 2]",
        json.dumps({"messages": []}).encode(),
        json.dumps({"response_format": {"type": "json_object"}}).encode(),
        json.dumps({"response_format": {"type": "json_schema", "json_schema": {"name": "no schema"}}}).encode(),
    ):
        assert rewrite_body(raw) is raw


def _call(scope: dict[str, Any], messages: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the middleware over a recording app; returns the scope and messages the app saw."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["scope"] = scope
        seen["messages"] = [await receive()]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    asyncio.run(OpenAIResponseFormat(app)(scope, receive, send))
    return seen["scope"], seen["messages"]


def test_middleware_rewrites_a_chunked_chat_request() -> None:
    raw = json.dumps({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-length", b"5")]}
    parts = [{"type": "http.request", "body": raw[:10], "more_body": True}, {"type": "http.request", "body": raw[10:]}]
    seen_scope, [message] = _call(scope, parts)
    assert json.loads(message["body"])["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert dict(seen_scope["headers"])[b"content-length"] == str(len(message["body"])).encode()


def test_middleware_leaves_other_routes_alone() -> None:
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": []}
    seen_scope, [message] = _call(scope, [{"type": "http.request", "body": b"x"}])
    assert seen_scope is scope and message["body"] == b"x"
