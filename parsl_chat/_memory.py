"""Keeping the end of a run lean: memory handed back to the system between its passes.

The end of a run reads a million-row ledger and results file in passes, each
allocating and freeing arrays of a number per row. glibc keeps some of what is
freed: in its heap (large blocks, once it has raised its mmap threshold) and in
other threads' arenas (the Arrow JSON reader's), where the next pass cannot
reuse it. Measured on a million rows (BENCHMARKS.md §3): 17 MB after a ledger
pass, 15 MB off the summary's peak. Both calls are glibc's; elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from typing import Any

__all__ = ["map_large_blocks", "release"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Blocks of ``threshold`` bytes or more are mapped on allocation and unmapped when freed.

    glibc's default threshold starts at 128 KiB but rises to the size of any mapped block freed,
    after which arrays of 8 MB come from the heap and stay in it.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)


def release() -> None:
    """Free what cycles hold, Arrow's unused pages, and what glibc keeps in any arena."""
    gc.collect()
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
