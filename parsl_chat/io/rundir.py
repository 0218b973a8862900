"""``run.json``: a run directory's metadata, read and written here only.

It says what the run was asked (command, profile, options), where it stands
(status, unfinished prompts), and what it started (blocks, local Parsl processes),
so that ``--resume`` and ``cleanup`` can find and end what an earlier driver left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._files import atomic_write
from ..errors import OutputError

__all__ = ["read_run_meta", "run_meta_or_note", "write_run_meta"]


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json``; OutputError (exit 2) if ``run_dir`` is not a run directory."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise OutputError(f"{run_dir}: not a parsl-chat run directory (no run.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable run metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise OutputError(f"{path}: unreadable run metadata (not a JSON object)")
    return meta


def run_meta_or_note(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """``run.json`` for readers that go on without it (the report, the results' column plan).

    Returns ``({}, why)`` where it is missing or unreadable, ``(meta, None)`` otherwise.
    """
    if not (run_dir / "run.json").is_file():
        return {}, "run.json is missing: run metadata (agents, slots, blocks) unknown"
    try:
        return read_run_meta(run_dir), None
    except OutputError as exc:
        return {}, f"{str(exc).removeprefix(str(run_dir / 'run.json') + ': ')}: run metadata ignored"


def write_run_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Replace ``run.json`` whole: a reader (``cleanup`` after a crash) never sees half of it."""
    atomic_write(run_dir / "run.json", json.dumps(meta, indent=2))
