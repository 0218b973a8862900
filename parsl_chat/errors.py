"""One exception tree for the whole library.

The library raises; only ``cli.py`` turns these into messages and exit codes.
Each class carries its exit code (docs/interfaces.md, "Exit codes"), so the CLI needs no table.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ExecutorError",
    "InputError",
    "OutputError",
    "ParslChatError",
    "RunFailed",
    "RunInterrupted",
    "ServerError",
    "ServerLost",
    "UsageError",
]


class ParslChatError(Exception):
    """Base of every error parsl-chat raises on purpose."""

    exit_code = 1
    #: One line telling the user what to do next (printed after the message).
    hint: str | None = None

    def __init__(self, message: str, problems: list[str] | None = None, *, hint: str | None = None) -> None:
        super().__init__(message)
        #: Detail lines printed under the message (a bad file's ``file:line: what`` lines, a failed run's first errors).
        self.problems = problems or []
        if hint is not None:
            self.hint = hint


class UsageError(ParslChatError):
    """Bad command-line use; nothing was sent."""

    exit_code = 2


class InputError(UsageError):
    """A bad prompts file. ``problems`` holds every ``file:line: what`` line found."""


class ConfigError(UsageError):
    """A bad profile, config file, environment variable or option value."""


class OutputError(UsageError):
    """The run directory cannot be created or written."""


class ServerError(ParslChatError):
    """The model server could not be started or never became ready."""

    exit_code = 2


class ServerLost(ServerError):
    """A model server that ran died and cannot be restarted: the run stops, to be resumed."""

    exit_code = 3


class ExecutorError(ParslChatError):
    """The execution backend (Parsl, SLURM, Kubernetes) could not be brought up."""

    exit_code = 2


class RunFailed(ParslChatError):
    """The run finished, but with more failed prompts than ``--max-failures`` allows.

    ``problems`` holds the first error message of each error type.
    """

    exit_code = 1


class RunInterrupted(ParslChatError):
    """A signal or the walltime stopped the run; the run directory can be resumed."""

    exit_code = 3
