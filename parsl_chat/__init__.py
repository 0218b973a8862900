"""parsl-chat: push many chat prompts through LLM agents on SLURM, Kubernetes or a laptop, with Parsl.

The library raises :class:`~parsl_chat.errors.ParslChatError` subclasses; the
``parsl-chat`` CLI turns them into one-line messages and exit codes.

Layers, lowest first. A module imports only from its own layer and from the
layers named after ``->`` (tests/test_architecture.py reads this table and checks
every import, lazy ones included; a new module must be given a layer here):

    base      errors _files _memory _processes _secrets _signals progress
    core      config core                  -> base
    io        io                           -> core base
    serve     serve                        -> io core base
    worker    worker                       -> serve io core base
    backends  backends                     -> worker serve io core base
    report    analysis report              -> io core base
    run       run                          -> backends worker report serve io core base
    chat      chat                         -> run backends worker report serve io core base
    cli       cli __main__                 -> chat run backends worker report serve io core base

So: what a Parsl worker runs (worker) never imports how it is launched
(backends) or driven (run); the report reads run directories and knows nothing
of execution; nothing imports the CLI.
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
