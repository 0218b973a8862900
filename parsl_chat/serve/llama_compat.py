"""OpenAI's spelling of structured output for the embedded llama.cpp server.

llama-cpp-python's server (0.3.x) takes a schema as
``{"type": "json_object", "schema": {...}}`` and turns it into a grammar, so
the model can only write JSON matching it; OpenAI, vLLM and parsl-chat spell
the same request ``{"type": "json_schema", "json_schema": {"name", "schema",
"strict"}}``, which llama-cpp-python refuses (HTTP 500, "Input should be
'text' or 'json_object'"). :class:`OpenAIResponseFormat` rewrites the one into
the other in front of the server, so the embedded server answers requests
exactly as a vLLM or OpenAI endpoint would.

Imported by the embedded server's start-up shim (parsl_chat.serve.server), in the
model server's process; nothing here imports llama_cpp until :func:`install`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["OpenAIResponseFormat", "install", "rewrite_body"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def rewrite_body(raw: bytes) -> bytes:
    """A chat request with ``json_schema`` in llama-cpp-python's spelling; any other body as it came."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw  # the server's own validation answers it
    response_format = body.get("response_format") if isinstance(body, dict) else None
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return raw
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        return raw
    body["response_format"] = {"type": "json_object", "schema": spec["schema"]}
    return json.dumps(body).encode()


class OpenAIResponseFormat:
    """ASGI middleware: POSTs to ``.../chat/completions`` get :func:`rewrite_body`; everything else passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: let the app see it
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = rewrite_body(b"".join(chunks))
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        request = {"type": "http.request", "body": body, "more_body": False}
        await self.app({**scope, "headers": headers}, _replay(request, receive), send)


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that hands out ``first`` once, then what the client sends next (a disconnect)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def install() -> None:
    """Make llama_cpp.server's ``create_app`` return its app behind :class:`OpenAIResponseFormat`."""
    import llama_cpp.server.app as server_app

    create = server_app.create_app

    @functools.wraps(create)
    def create_app(*args: Any, **kwargs: Any) -> OpenAIResponseFormat:
        return OpenAIResponseFormat(create(*args, **kwargs))

    server_app.create_app = create_app
