"""Masking secrets in what the HTML report shows of a run's configuration."""

from __future__ import annotations

import re
from typing import Any

from .._secrets import SECRET_WORDS

__all__ = ["redact", "redact_text"]


_SECRET_KEY = re.compile(rf"(?:^|[_.-]){SECRET_WORDS}$", re.IGNORECASE)


_SECRET_TEXT = (
    # `key: value` / `key=value` lines whose key ends in a secret word (max_tokens does not: it ends in "tokens")
    (
        re.compile(
            rf"(?im)^([ \t]*-?[ \t]*[\"']?(?:[\w.-]*[_.-])?{SECRET_WORDS}[\"']?[ \t]*[:=][ \t]*)"
            r"(?!(?:null|~|''|\"\"|\*+)?[ \t]*$)\S.*$"
        ),
        r"\1'***'",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-]+"), "Bearer ***"),
)


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret-looking keys' values and key-like strings replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") and not isinstance(v, (dict, list)) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """``text`` with ``key: value`` lines of secret-looking keys, ``sk-...`` keys and bearer tokens masked."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text
