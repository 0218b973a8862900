"""Lookups: one process's index of a cache directory, 28 bytes per entry in numpy arrays."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .segment import (
    COMPACT_PREFIX,
    HEAD,
    INDEX,
    SEALED,
    SEGMENTS,
    as_numpy,
    key_prefix,
    list_segments,
    load_index,
    read_line,
    scan_lines,
    valid_key,
)

__all__ = ["REFRESH_S", "Reader"]

log = logging.getLogger("parsl_chat.io.cache")

#: how often a reader looks for segments other writers added meanwhile: a listing and a stat
#: per open segment each time, on a metadata server shared by every worker of every run
REFRESH_S = 10.0
_MAX_OPEN_FILES = 64

# --------------------------------------------------------------------------- reading


class _Gone(Exception):
    """A file the index points into is no longer there."""


#: new index entries of one file: (prefixes, seconds, file numbers, offsets)
_Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _File:
    name: str
    number: int
    scanned_to: int = 0
    sealed: bool = False
    damaged: int = 0


class Reader:
    """One process's view of a cache directory: lookups against an index refreshed from time to time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.segments = root / SEGMENTS
        self.files: dict[str, _File] = {}
        self._names: list[str] = []  # file number -> current name
        # the merged index, sorted by (prefix, second): 8 + 8 + 4 + 8 bytes per entry
        self.prefixes = np.zeros(0, dtype=np.uint64)
        self.seconds = np.zeros(0, dtype=np.uint64)
        self.numbers = np.zeros(0, dtype=np.uint32)
        self.offsets = np.zeros(0, dtype=np.uint64)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._refreshed = -float("inf")

    def __repr__(self) -> str:
        return f"Reader({str(self.root)!r}, entries={len(self.prefixes)}, files={len(self.files)})"

    def refresh(self, force: bool = False) -> None:
        """Take in segments added or grown since the last look, drop those compaction removed."""
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        listing = list_segments(self.segments)
        gone = [stem for stem in self.files if stem not in listing]
        parts: list[_Part] = []
        for stem, name in listing.items():
            known = self.files.get(stem)
            if known is not None and known.sealed:
                continue
            if known is None:
                known = self.files[stem] = _File(name, self._number_for(name))
            known.name = name
            self._names[known.number] = name
            part = self._take(known)
            if part is not None:
                parts.append(part)
        if gone or parts:
            self._rebuild(parts, {self.files.pop(stem).number for stem in gone})

    def _number_for(self, name: str) -> int:
        self._names.append(name)
        return len(self._names) - 1

    def _take(self, entry: _File) -> _Part | None:
        """New index entries of one file (a compacted file's .idx, else its lines past ``scanned_to``)."""
        path = self.segments / entry.name
        sealed = entry.name.endswith(SEALED)
        try:
            if sealed and entry.scanned_to == 0 and entry.name.startswith(COMPACT_PREFIX):
                arrays = load_index(path.with_suffix(INDEX))
                if arrays is not None:
                    entry.sealed = True
                    prefixes, seconds, offsets = arrays
                    return prefixes, seconds, np.full(len(prefixes), entry.number, dtype=np.uint32), offsets
            if not sealed and path.stat().st_size <= entry.scanned_to:
                return None  # an open segment that has not grown: no need to open it
            found = scan_lines(path, entry.scanned_to, sealed=sealed)
        except FileNotFoundError:
            return None  # renamed (sealed) or compacted away since the listing: the next refresh sees it
        entry.scanned_to, entry.sealed = found.end, sealed
        entry.damaged += found.damaged
        if found.damaged:
            log.warning("cache %s: skipped %d damaged line(s) in %s", self.root, found.damaged, entry.name)
        if not found.prefixes:
            return None
        return (
            as_numpy(found.prefixes),
            as_numpy(found.seconds),
            np.full(len(found.prefixes), entry.number, dtype=np.uint32),
            as_numpy(found.offsets),
        )

    def _rebuild(self, parts: list[_Part], removed: set[int]) -> None:
        prefixes, seconds, numbers, offsets = self.prefixes, self.seconds, self.numbers, self.offsets
        if removed:
            keep = ~np.isin(numbers, np.array(sorted(removed), dtype=np.uint32))
            prefixes, seconds, numbers, offsets = prefixes[keep], seconds[keep], numbers[keep], offsets[keep]
            for number in removed:
                fd = self._fds.pop(number, None)
                if fd is not None:
                    os.close(fd)
        if parts:
            prefixes = np.concatenate([prefixes, *(p[0] for p in parts)])
            seconds = np.concatenate([seconds, *(p[1] for p in parts)])
            numbers = np.concatenate([numbers, *(p[2] for p in parts)])
            offsets = np.concatenate([offsets, *(p[3] for p in parts)])
        order = np.lexsort((seconds, prefixes))
        self.prefixes, self.seconds, self.numbers, self.offsets = prefixes[order], seconds[order], numbers[order], offsets[order]

    def __len__(self) -> int:
        return len(self.prefixes)

    def get(self, key: bytes) -> dict[str, Any] | None:
        """The record stored under ``key``, or None.

        A file compacted away since the last refresh makes the reader look again at once:
        the compacted file holding its entries was in place before the file was deleted.
        """
        self.refresh()
        try:
            return self._find(key)
        except _Gone:
            self.refresh(force=True)
        try:
            return self._find(key)
        except _Gone:
            return None  # compacted away twice in a row: a miss, the request is sent

    def _find(self, key: bytes) -> dict[str, Any] | None:
        prefix, second = np.uint64(key_prefix(key)), np.uint64(int.from_bytes(key[8:], "big"))
        lo, hi = np.searchsorted(self.prefixes, prefix, "left"), np.searchsorted(self.prefixes, prefix, "right")
        for pos in range(int(lo), int(hi)):
            if self.seconds[pos] != second:
                continue
            record = self._record(int(self.numbers[pos]), int(self.offsets[pos]), key)
            if record is not None:
                return record
        return None

    def _record(self, number: int, offset: int, key: bytes) -> dict[str, Any] | None:
        try:
            line = read_line(self._fd(number), offset)
        except OSError:  # compacted away (ENOENT, NFS's ESTALE)
            fd = self._fds.pop(number, None)
            if fd is not None:
                os.close(fd)
            raise _Gone from None
        if valid_key(line) != key:
            return None
        record: dict[str, Any] = json.loads(line[HEAD:-1])
        return record

    def _fd(self, number: int) -> int:
        fd = self._fds.get(number)
        if fd is not None:
            self._fds.move_to_end(number)
            return fd
        fd = os.open(self.segments / self._names[number], os.O_RDONLY)
        self._fds[number] = fd
        if len(self._fds) > _MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
