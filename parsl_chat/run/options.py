"""What ``run`` was asked to do, and what it came to."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunOptions", "RunOutcome"]

log = logging.getLogger("parsl_chat.run")


@dataclass
class RunOptions:
    """Everything ``run`` was asked to do, as given on the command line."""

    prompts: str | None
    profile: str | None = None
    config_file: str | None = None
    out: Path | None = None
    resume: Path | None = None
    no_parsl: bool | None = None  # None: a new run uses Parsl, a resume does what the run did
    dry_run: bool = False
    skip_invalid: bool = False
    retry_failed: bool = False
    force: bool = False
    quiet: bool = False
    cli_settings: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    grace_s: float = 15.0


@dataclass
class RunOutcome:
    run_dir: Path
    exit_code: int
    summary: dict[str, Any]
    message: str
