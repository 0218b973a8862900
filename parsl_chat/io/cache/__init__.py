"""The response cache: answers shared across runs, on a filesystem every node can reach.

A request's *key* is a hash of its body as sent (model, the full message list with
the system prompt, every sampling parameter, ``response_format``); the endpoint URL
and the API key are not in the body, so never in the key. An answer is found again
by the same request from any run, on any node, against any endpoint.

Many workers on many nodes write at once, on NFS or Lustre where POSIX locks cannot
be trusted, so nothing here takes a lock. Each writer process appends to its own
segment file (``segments/<host>-<pid>-<random>.open``), one line per answer, and
renames it to ``.seg`` once done (sealed). A line carries its key and a CRC of its
JSON, so a torn or garbled line (a writer killed mid-write, a client crash that
left zeros on NFS) is recognised and skipped, never read as an answer.
``parsl-chat cache compact`` merges the sealed segments into one
``compact-*.seg`` with a sorted ``.idx`` beside it, and only then deletes what it
merged: every entry is in at least one file at every moment.

Readers (the workers) keep an index of 28 bytes per entry in numpy arrays (the
key's two halves, file number, offset), never a Python object per entry, and read
an answer's line only when its key is asked for.

The package by role: :mod:`.segment` (keys, the line format, file names),
:mod:`.directory` (the marker, :func:`prepare`), :mod:`.reader` and :mod:`.writer`
(one process's lookups and appends), :mod:`.store` (what a worker calls) and
:mod:`.maintenance` (``parsl-chat cache stats``, ``compact``, ``clear``).
"""

from __future__ import annotations

from .directory import prepare
from .maintenance import CacheStats, CompactResult, clear, compact, iter_records, stats
from .reader import Reader
from .segment import encode_line, request_key, sampled
from .store import CacheQuery, Hit, hit_outcome, plan_notes, query, row_columns
from .writer import Writer

__all__ = [
    "CacheQuery",
    "CacheStats",
    "CompactResult",
    "Hit",
    "Reader",
    "Writer",
    "clear",
    "compact",
    "encode_line",
    "hit_outcome",
    "iter_records",
    "plan_notes",
    "prepare",
    "query",
    "request_key",
    "row_columns",
    "sampled",
    "stats",
]
