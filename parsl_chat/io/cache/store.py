"""What a worker calls: the per-process store of a cache directory, a request's query, its row columns."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...config import CacheConfig
from ..rows import Row
from .reader import Reader
from .segment import encode_line, request_key, sampled
from .writer import IDLE_SEAL_S, Writer

__all__ = ["CacheQuery", "Hit", "hit_outcome", "plan_notes", "query", "row_columns"]

log = logging.getLogger("parsl_chat.io.cache")

#: the result columns a worker row gets: ``cached`` true (hit), false (asked, missed) or None (not asked)
NOT_ASKED: Row = {"cached": None, "cached_from": None, "cached_at": None, "cached_latency_s": None}

# --------------------------------------------------------------------------- the per-process store


class _Store:
    """A cache directory as one process uses it: a reader, and a writer made at the first answer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.reader = Reader(root)
        self.writer: Writer | None = None
        self.broken = False  # an unreadable or unwritable directory: every lookup is a miss, said once

    def lookup(self, key: bytes) -> dict[str, Any] | None:
        if self.broken:
            return None
        try:
            return self.reader.get(key)
        except (OSError, ValueError) as exc:
            self._broke("read", exc)
            return None

    def store(self, key: bytes, record: Mapping[str, Any]) -> None:
        if self.broken:
            return
        if self.writer is None:
            self.writer = Writer(self.root)
        try:
            self.writer.append(encode_line(key, record))
        except OSError as exc:
            log.warning("cache %s: could not store an answer (%s); this answer stays uncached", self.root, exc)
            return
        _schedule_idle_seal(self.writer)

    def _broke(self, what: str, exc: BaseException) -> None:
        self.broken = True
        log.warning("cache %s: cannot %s it (%s: %s); this process sends every request", self.root, what, type(exc).__name__, exc)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _store(root: str) -> _Store:
    with _STORES_LOCK:
        store = _STORES.get(root)
        if store is None:
            store = _STORES[root] = _Store(Path(root))
        return store


def _schedule_idle_seal(writer: Writer) -> None:
    """Seal the writer's segment once it has been idle, on the event loop that writes (when there is one)."""
    import asyncio

    if writer.timer is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop (tests, tools): atexit seals

    def check() -> None:
        writer.timer = None if writer.seal_if_idle() else loop.call_later(IDLE_SEAL_S, check)

    writer.timer = loop.call_later(IDLE_SEAL_S, check)


@atexit.register
def _seal_all() -> None:
    for store in list(_STORES.values()):
        if store.writer is not None:
            try:
                store.writer.seal()
            except OSError:
                pass


# --------------------------------------------------------------------------- what a worker calls


@dataclass(frozen=True)
class Hit:
    """An answer found in the cache, as a worker turns it into a row."""

    record: dict[str, Any]
    started_at: float
    finished_at: float

    def columns(self) -> Row:
        return {
            "cached": True,
            "cached_from": self.record.get("run_id"),
            "cached_at": self.record.get("finished_at"),
            "cached_latency_s": self.record.get("latency_s"),
            "latency_s": None,  # no request was sent: its original latency is in cached_latency_s
        }


@dataclass(frozen=True)
class CacheQuery:
    """One request as the cache sees it: looked up before a slot is taken, stored after an ok answer."""

    store: _Store
    key: bytes
    writable: bool

    def lookup(self) -> Hit | None:
        started = time.time()
        record = self.store.lookup(self.key)
        if record is None or not isinstance(record.get("response"), str):
            return None
        return Hit(record, started, time.time())

    def save(self, outcome: Any, run_id: str) -> None:
        """Keep an ok answer (an :class:`~parsl_chat.core.agents.Outcome`); never the endpoint or the key."""
        if not self.writable or outcome.status != "ok":
            return
        latency = outcome.finished_at - outcome.started_at if outcome.started_at and outcome.finished_at else None
        record = {
            "model": outcome.model,
            "response": outcome.response,
            "finish_reason": outcome.finish_reason,
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "latency_s": round(latency, 6) if latency is not None else None,
            "finished_at": datetime.fromtimestamp(outcome.finished_at or time.time(), tz=timezone.utc).isoformat(),
            "run_id": run_id,
        }
        self.store.store(self.key, record)

    @staticmethod
    def columns(hit: Hit | None) -> Row:
        return hit.columns() if hit is not None else {**NOT_ASKED, "cached": False}


def query(cfg: CacheConfig | None, body: Mapping[str, Any]) -> CacheQuery | None:
    """The cache's handle on one request body, or None when this request is not cached
    (no cache, or a sampled answer the user did not ask to cache)."""
    if cfg is None or cfg.mode == "off" or not cfg.dir:
        return None
    if sampled(body) and not cfg.sampled:
        return None
    return CacheQuery(_store(cfg.dir), request_key(body), cfg.mode == "read_write")


def row_columns(cache_query: CacheQuery | None, hit: Hit | None) -> Row:
    """The cache columns of a worker's row; none when the cache was not asked (they read as empty)."""
    return {} if cache_query is None else CacheQuery.columns(hit)


def hit_outcome(hit: Hit) -> dict[str, Any]:
    """Keyword arguments of the :class:`~parsl_chat.core.agents.Outcome` of a hit: no request, no attempt."""
    record = hit.record
    return {
        "status": "ok",
        "attempts": 0,
        "started_at": hit.started_at,
        "finished_at": hit.finished_at,
        "response": record["response"],
        "finish_reason": record.get("finish_reason"),
        "prompt_tokens": record.get("prompt_tokens"),
        "completion_tokens": record.get("completion_tokens"),
        "model": record.get("model"),
    }


def plan_notes(cfg: CacheConfig | None, agent_params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a user should know before the run: agents whose answers the cache will not keep."""
    if cfg is None or cfg.sampled:
        return []
    uncached = [name for name, params in agent_params.items() if sampled(params)]
    if not uncached:
        return []
    return [
        f"cache: agent(s) {', '.join(uncached)} sample with temperature > 0 (or unset: the server's default, usually 1); "
        "their answers are neither looked up nor stored (set temperature: 0, or cache.sampled: true to cache them)"
    ]
