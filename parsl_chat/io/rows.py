"""A result row as Python code passes it around: :class:`Row`, one key per column of ``results.SCHEMA``.

The ledger holds the same rows as JSON lines (timestamps as ISO strings), plus
the prompt's content ``digest`` (:class:`LedgerRow`). tests/io/test_results.py
checks that the keys here are the schema's columns, so the two move together.
Rows are partial (every key optional): an ``invalid`` or ``unfinished`` row has only some.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["LedgerRow", "Place", "Row", "ServerTimes"]


class Place(TypedDict, total=False):
    """Where a row was answered (``worker.executor.where_am_i``)."""

    hostname: str | None
    node: str | None
    worker: str | None
    block: str | None
    job_id: str | None


class ServerTimes(TypedDict, total=False):
    """Where the model server spent a request's latency (llama-server's timings; None from others)."""

    server_queue_s: float | None
    server_prompt_s: float | None
    server_generation_s: float | None


class Row(Place, ServerTimes, total=False):
    """One prompt's outcome: the result schema's columns (results.COLUMNS)."""

    custom_id: str
    line: int
    agent: str | None
    model: str | None
    endpoint: str | None
    conversation: str | None
    turn: int | None
    status: str
    error_type: str | None
    error: str | None
    attempts: int | None
    submitted_at: str | None  # ISO 8601, UTC
    started_at: str | None
    finished_at: str | None
    queue_s: float | None
    latency_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    response: str | None
    parsed: str | None  # a structured answer as JSON text
    cached: bool | None
    cached_from: str | None
    cached_at: str | None
    cached_latency_s: float | None


class LedgerRow(Row, total=False):
    """A ledger line: a row and the content digest of its prompt (a resume resends a prompt whose content changed)."""

    digest: str | None
