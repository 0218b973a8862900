"""``parsl-chat cache stats``, ``compact`` and ``clear``, and a reader of every record for tools."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..._processes import pid_alive
from .directory import open_cache_dir
from .segment import (
    COMPACT_PREFIX,
    HEAD,
    INDEX,
    KEY_HEX,
    OPEN,
    SEALED,
    SEGMENTS,
    TMP,
    as_numpy,
    file_kind,
    file_stem,
    list_segments,
    read_line,
    scan_lines,
)

__all__ = ["DEFAULT_IDLE_S", "CacheStats", "CompactResult", "clear", "compact", "iter_records", "stats"]

DEFAULT_IDLE_S = 600.0

# --------------------------------------------------------------------------- stats, compact, clear


@dataclass
class CacheStats:
    """What ``parsl-chat cache stats`` shows."""

    root: str
    entries: int = 0  # distinct keys
    records: int = 0  # undamaged lines (duplicates included)
    damaged: int = 0
    files: dict[str, int] = field(default_factory=lambda: {"open": 0, "sealed": 0, "compacted": 0})
    bytes: int = 0

    @property
    def duplicates(self) -> int:
        return self.records - self.entries

    def as_dict(self) -> dict[str, Any]:
        return {
            "dir": self.root,
            "entries": self.entries,
            "records": self.records,
            "duplicates": self.duplicates,
            "damaged_lines": self.damaged,
            "files": dict(self.files),
            "bytes": self.bytes,
        }


@dataclass
class _Entries:
    """Every undamaged line of a set of files: numpy arrays, 28 bytes per line."""

    names: list[str]
    prefixes: np.ndarray
    seconds: np.ndarray
    numbers: np.ndarray
    offsets: np.ndarray
    damaged: int

    def unique(self) -> np.ndarray:
        """Positions of one line per distinct key, in key order."""
        order = np.lexsort((self.seconds, self.prefixes))
        if not len(order):
            return order
        p, s = self.prefixes[order], self.seconds[order]
        first = np.concatenate([[True], (p[1:] != p[:-1]) | (s[1:] != s[:-1])])
        return order[first]


def _collect(segments: Path, names: list[str]) -> _Entries:
    prefixes: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    numbers: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    damaged = 0
    kept: list[str] = []
    for name in names:
        path = segments / name
        try:
            found = scan_lines(path, 0, sealed=True)
        except FileNotFoundError:
            continue  # compacted or sealed meanwhile by someone else
        number = len(kept)
        kept.append(name)
        damaged += found.damaged
        prefixes.append(as_numpy(found.prefixes))
        seconds.append(as_numpy(found.seconds))
        numbers.append(np.full(len(found.prefixes), number, dtype=np.uint32))
        offsets.append(as_numpy(found.offsets))

    def joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return _Entries(
        kept,
        joined(prefixes, np.uint64),
        joined(seconds, np.uint64),
        joined(numbers, np.uint32),
        joined(offsets, np.uint64),
        damaged,
    )


def stats(path: str | Path) -> CacheStats:
    root = open_cache_dir(path)
    segments = root / SEGMENTS
    out = CacheStats(str(root))
    names = sorted(list_segments(segments).values())
    for name in names:
        kind = file_kind(name)
        assert kind is not None
        out.files[kind] += 1
        try:
            out.bytes += (segments / name).stat().st_size
        except FileNotFoundError:
            pass
    entries = _collect(segments, names)
    out.records, out.damaged, out.entries = len(entries.prefixes), entries.damaged, len(entries.unique())
    return out


@dataclass
class CompactResult:
    root: str
    merged_files: int
    left_open: int  # segments still being written (or not idle for idle_s yet)
    entries: int
    dropped: int  # duplicate and damaged lines not carried over
    output: str | None
    bytes_before: int
    bytes_after: int


def compact(path: str | Path, idle_s: float = DEFAULT_IDLE_S) -> CompactResult:
    """Merge sealed segments (and open ones untouched for ``idle_s``) into one compacted file.

    The output is written under a temporary name, made durable and renamed into place
    (its index first) before any input is deleted, so an entry is never in no file.
    Two compactions at once each delete only what they merged: at worst an entry is in
    both outputs, which readers and the next compaction take as one.
    """
    root = open_cache_dir(path)
    segments = root / SEGMENTS
    now = time.time()
    inputs: list[str] = []
    left_open = 0
    _remove_stale_tmp(segments, now)
    for name in sorted(list_segments(segments).values()):
        if name.endswith(OPEN) and now - _mtime(segments / name, now) < idle_s and not _writer_gone(name):
            left_open += 1
            continue
        inputs.append(name)
    bytes_before = sum(_size(segments / n) for n in inputs)
    entries = _collect(segments, inputs)
    unique = entries.unique()
    output = None
    if len(entries.names) > 1 or entries.damaged or len(unique) < len(entries.prefixes) or _has_loose(entries.names):
        output = _write_compacted(segments, entries, unique)
        for name in entries.names:
            _remove(segments / name)
            if name.startswith(COMPACT_PREFIX):
                _remove((segments / name).with_suffix(INDEX))
    return CompactResult(
        root=str(root),
        merged_files=len(entries.names) if output else 0,
        left_open=left_open,
        entries=len(unique),
        dropped=len(entries.prefixes) - len(unique) + entries.damaged if output else 0,
        output=output,
        bytes_before=bytes_before,
        bytes_after=_size(segments / output) if output else bytes_before,
    )


def _writer_gone(name: str) -> bool:
    """Whether an open segment's writer is known to have ended: a process of this host that is gone (or a zombie).

    Parsl ends its workers without running atexit, so their last segments stay open; of a
    writer on another node nothing is known here, and only ``idle_s`` tells.
    """
    host, pid, _ = file_stem(name).rsplit("-", 2) if file_stem(name).count("-") >= 2 else ("", "", "")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


def _has_loose(names: list[str]) -> bool:
    """Whether any input is not already a compacted file (a lone segment still gets its index)."""
    return any(not n.startswith(COMPACT_PREFIX) for n in names)


def _write_compacted(segments: Path, entries: _Entries, unique: np.ndarray) -> str:
    stem = f"{COMPACT_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"
    data_tmp, index_tmp = segments / f"{stem}{SEALED}{TMP}", segments / f"{stem}{INDEX}{TMP}"
    new_offsets = np.zeros(len(unique), dtype=np.uint64)
    fds: dict[int, int] = {}
    try:
        with data_tmp.open("wb") as out:
            for i, pos in enumerate(unique):
                number = int(entries.numbers[pos])
                if number not in fds:
                    fds[number] = os.open(segments / entries.names[number], os.O_RDONLY)
                new_offsets[i] = out.tell()
                out.write(read_line(fds[number], int(entries.offsets[pos])))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)
    with index_tmp.open("wb") as fh:
        np.savez(fh, prefix=entries.prefixes[unique], second=entries.seconds[unique], offset=new_offsets)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(index_tmp, segments / f"{stem}{INDEX}")  # the index first: a data file without one is scanned
    os.replace(data_tmp, segments / f"{stem}{SEALED}")
    return f"{stem}{SEALED}"


def _remove_stale_tmp(segments: Path, now: float) -> None:
    """Temporary files of a compaction that died a day ago or more."""
    for name in os.listdir(segments):
        if name.endswith(TMP) and now - _mtime(segments / name, now) > 86400:
            _remove(segments / name)


def clear(path: str | Path) -> tuple[int, int]:
    """Delete every entry; returns (files, bytes) removed. A run writing meanwhile loses its new entries."""
    root = open_cache_dir(path)
    segments = root / SEGMENTS
    files = size = 0
    for name in os.listdir(segments):
        if file_kind(name) is not None or name.endswith((INDEX, TMP)):
            size += _size(segments / name)
            files += _remove(segments / name)
    return files, size


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove(path: Path) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def iter_records(path: str | Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Every undamaged record of a cache (duplicates included): for tests and tools, not for runs."""
    segments = open_cache_dir(path) / SEGMENTS
    for name in sorted(list_segments(segments).values()):
        entries = scan_lines(segments / name, 0, sealed=True)
        with (segments / name).open("rb") as fh:
            fd = fh.fileno()
            for offset in entries.offsets:
                line = read_line(fd, offset)
                yield bytes.fromhex(line[:KEY_HEX].decode()), json.loads(line[HEAD:-1])
