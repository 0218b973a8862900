"""The words that make a name a secret's, for every place that masks secrets in text.

One list: the server's log lines and the report's configuration are masked alike
(they had drifted apart: the server's lacked authorization, credentials and passwd).
"""

from __future__ import annotations

__all__ = ["SECRET_WORDS"]

#: a regular expression group: a key or option named with one of these holds a secret
SECRET_WORDS = r"(?:api[_-]?key|apikey|token|secret|password|passwd|authorization|credentials?)"
