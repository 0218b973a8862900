"""The cache directory: its marker file, made ready for a run or opened for ``parsl-chat cache``."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ...config import CacheConfig
from ...errors import ConfigError, UsageError
from .segment import FORMAT, MARKER, SEGMENTS, TMP

__all__ = ["marker_ok", "open_cache_dir", "prepare"]

# --------------------------------------------------------------------------- the directory


def marker_ok(root: Path) -> bool:
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def prepare(cfg: CacheConfig, where: str = "cache.dir") -> CacheConfig | None:
    """The cache a run uses (directory made absolute, created for read_write), or None when off.

    Raises :class:`ConfigError` (exit 2, nothing sent) for a directory that cannot be used.
    """
    if cfg.mode == "off" or not cfg.dir:
        return None
    root = Path(cfg.dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{where}: cache directory {root} is a file")
    if marker_ok(root):
        pass
    elif cfg.mode == "read":
        raise ConfigError(
            f"{where}: {root} is not a parsl-chat cache (no {MARKER})",
            hint="give a directory an earlier run filled (cache mode read_write creates one)",
        )
    elif root.exists() and _foreign_entries(root):
        raise ConfigError(
            f"{where}: {root} is not empty and not a parsl-chat cache (no {MARKER})",
            hint="give an empty or new directory, or one parsl-chat made",
        )
    else:
        _create(root, where)
    if cfg.mode == "read_write" and not os.access(root / SEGMENTS, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write to the cache in {root}", hint="use cache mode read, or another directory")
    return replace(cfg, dir=str(root))


def _foreign_entries(root: Path) -> list[str]:
    """What is in ``root`` that :func:`_create` does not make.

    Runs started together on a new cache (a job array) create it at the same moment: one
    sees the other's ``segments/`` or marker file in the making before the marker is there.
    """
    own = (SEGMENTS, f".{MARKER}.")
    return [entry.name for entry in root.iterdir() if not entry.name.startswith(own)]


def _create(root: Path, where: str) -> None:
    try:
        (root / SEGMENTS).mkdir(parents=True, exist_ok=True)
        tmp = root / f".{MARKER}.{secrets.token_hex(4)}{TMP}"
        tmp.write_text(json.dumps({"format": FORMAT, "created_at": _now_iso()}) + "\n", encoding="utf-8")
        os.replace(tmp, root / MARKER)  # two runs creating it at once: either file is the same
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create the cache in {root}: {exc.strerror}") from None


def open_cache_dir(path: str | Path) -> Path:
    """A directory given to ``parsl-chat cache``: it must be a cache."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"{root}: no such cache directory")
    if not marker_ok(root):
        raise UsageError(f"{root}: not a parsl-chat cache (no {MARKER} of format {FORMAT})")
    return root


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
