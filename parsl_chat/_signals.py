"""Signal handlers installed for a while and then put back: the run, the chat and ``serve`` each need some."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["Handler", "handling", "install_handlers", "restore_handlers"]

Handler = Callable[[int, FrameType | None], Any]


def install_handlers(signals: Iterable[signal.Signals], handler: Handler) -> dict[int, Any]:
    """Point ``signals`` at ``handler``; returns the handlers they had, for :func:`restore_handlers`.

    Only the main thread may set handlers (Python refuses elsewhere): from another thread
    (a library caller, a test) nothing is changed and the dict is empty.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handling(signals: Iterable[signal.Signals], handler: Handler) -> Iterator[None]:
    """``handler`` for ``signals`` while the block runs, the previous handlers after it."""
    previous = install_handlers(signals, handler)
    try:
        yield
    finally:
        restore_handlers(previous)
