"""parsl-chat: push many chat prompts through LLM agents on SLURM, Kubernetes or a laptop, with Parsl.

The library raises :class:`~parsl_chat.errors.ParslChatError` subclasses; the
``parsl-chat`` CLI turns them into one-line messages and exit codes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    ConfigError,
    ExecutorError,
    InputError,
    OutputError,
    ParslChatError,
    RunFailed,
    RunInterrupted,
    ServerError,
    UsageError,
)

__all__ = [
    "ConfigError",
    "ExecutorError",
    "InputError",
    "OutputError",
    "ParslChatError",
    "RunFailed",
    "RunInterrupted",
    "ServerError",
    "UsageError",
    "__version__",
]
