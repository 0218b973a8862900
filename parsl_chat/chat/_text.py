"""Small text helpers of the chat: timestamps, URLs without credentials, one-line messages."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

__all__ = ["http_message", "now_iso", "one_line", "public_url"]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def public_url(url: str) -> str:
    """A URL without user:password (endpoints may carry credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def one_line(text: str, limit: int = 0) -> str:
    text = " ".join(text.split())
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def http_message(message: str) -> str:
    """``HTTP 500: {"error": {"message": ...}}`` (a streamed request's raw body) as ``HTTP 500: message``."""
    head, sep, body = message.partition(": ")
    if sep and head.startswith("HTTP ") and body.lstrip().startswith("{"):
        try:
            data = json.loads(body)
            error = data.get("error")
            text = error.get("message") if isinstance(error, dict) else error
            if text:
                return f"{head}: {text}"
        except (ValueError, AttributeError):
            pass
    return message
