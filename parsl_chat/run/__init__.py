"""The run: prepare, plan, dispatch, stop, finish (``parsl-chat run``), as :func:`execute_run`.

Modules by role: options (what was asked), prepare (run directory, settings, log, resume
checks), plan (fleet, slots, chunks, work items), dispatch (the loop), stopping (signals,
walltime), finish (results, summary), pipeline (the stages in order).
"""

from __future__ import annotations

from .options import RunOptions, RunOutcome
from .pipeline import execute_run
from .plan import NODE_LOCAL_ENDPOINT, chunk_size, describe_fleet, endpoint_and_server, fleet_lines, slots_per_worker
from .prepare import cache_notes, new_run_dir, prepare_cache, run_id_for

__all__ = [
    "NODE_LOCAL_ENDPOINT",
    "RunOptions",
    "RunOutcome",
    "cache_notes",
    "chunk_size",
    "describe_fleet",
    "endpoint_and_server",
    "execute_run",
    "fleet_lines",
    "new_run_dir",
    "prepare_cache",
    "run_id_for",
    "slots_per_worker",
]
