"""The ledger: an append-only JSON Lines record of every finished prompt.

It is the run's source of truth and its resume log. Records are appended as
soon as a chunk's rows reach the driver and flushed at once, so killing the
driver (even with SIGKILL) loses only requests still in flight; an fsync
follows at most once a second so a node crash loses little more. Reading
tolerates a torn last line. The index of what is done keeps 17 bytes per
prompt (id hash, content hash, ok flag) rather than one Python object each.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .rows import LedgerRow

__all__ = ["Ledger", "LedgerIndex", "digest_matches", "id_hash", "read_ledger"]


def id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


def _digest_int(digest: str | None) -> int:
    return int(digest, 16) if digest else 0


class Ledger:
    """Appends rows to ``ledger.jsonl``."""

    FSYNC_EVERY_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None
        self._last_sync = 0.0
        self.appended = 0

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, appended={self.appended})"

    def open(self) -> Ledger:
        self._repair_tail()
        self._fh = self.path.open("a", encoding="utf-8")
        return self

    def _repair_tail(self) -> None:
        """A torn last line (the driver died mid-write) is cut off so appends start clean."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
            # look backwards for the last newline, a block at a time: a big ledger is never read whole
            pos = fh.seek(0, os.SEEK_END)
            keep = 0
            while pos > 0:
                step = min(1 << 16, pos)
                pos -= step
                fh.seek(pos)
                newline = fh.read(step).rfind(b"\n")
                if newline >= 0:
                    keep = pos + newline + 1
                    break
            fh.truncate(keep)

    def append(self, rows: Iterable[LedgerRow] | Iterable[Mapping[str, Any]]) -> None:
        # the driver still holds its rows as plain dicts; the workers' are LedgerRows
        assert self._fh is not None, "open() first"
        text = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
        if not text:
            return
        self._fh.write(text)
        self._fh.flush()
        self.appended += text.count("\n")
        now = time.monotonic()
        if now - self._last_sync >= self.FSYNC_EVERY_S:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def __enter__(self) -> Ledger:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_ledger(path: Path) -> Iterator[LedgerRow]:
    """Every complete record; a torn or garbled last line is skipped."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # torn tail: the write that was cut never counted
            try:
                yield json.loads(raw)
            except ValueError:
                continue


@dataclass
class LedgerIndex:
    """What the ledger says is done: sorted id hashes with content hash and outcome."""

    ids: np.ndarray  # uint64, sorted
    digests: np.ndarray  # uint64
    ok: np.ndarray  # bool
    records: int

    @classmethod
    def load(cls, path: Path) -> LedgerIndex:
        ids: list[int] = []
        digests: list[int] = []
        oks: list[bool] = []
        for row in read_ledger(path):
            ids.append(id_hash(row["custom_id"]))
            digests.append(_digest_int(row.get("digest")))
            oks.append(row.get("status") == "ok")
        id_arr = np.array(ids, dtype=np.uint64)
        dig_arr = np.array(digests, dtype=np.uint64)
        ok_arr = np.array(oks, dtype=bool)
        # the last record of an id wins (a retried failure later succeeded)
        order = np.argsort(id_arr, kind="stable")
        id_arr, dig_arr, ok_arr = id_arr[order], dig_arr[order], ok_arr[order]
        if len(id_arr):
            last = np.append(id_arr[1:] != id_arr[:-1], True)
            id_arr, dig_arr, ok_arr = id_arr[last], dig_arr[last], ok_arr[last]
        return cls(id_arr, dig_arr, ok_arr, len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, custom_id: str) -> tuple[bool, int] | None:
        """(ok, content hash) of a recorded id, else None."""
        if not len(self.ids):
            return None
        key = np.uint64(id_hash(custom_id))
        pos = int(np.searchsorted(self.ids, key))
        if pos < len(self.ids) and self.ids[pos] == key:
            return bool(self.ok[pos]), int(self.digests[pos])
        return None

    @property
    def failed(self) -> int:
        return int((~self.ok).sum())


def digest_matches(recorded: int, digest: str | None) -> bool:
    return recorded == 0 or recorded == _digest_int(digest)
