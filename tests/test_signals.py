"""_signals: handlers set for a while, then the previous ones back; from another thread, nothing changes."""

from __future__ import annotations

import os
import signal
import threading

from parsl_chat._signals import handling, install_handlers


def test_handling_sets_then_restores_and_the_handler_runs() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    seen: list[int] = []
    with handling((signal.SIGUSR2,), lambda signum, frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signal.getsignal(signal.SIGUSR2) is not before
    assert seen == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) == before


def test_from_another_thread_nothing_is_changed() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    got: list[dict[int, object]] = []
    thread = threading.Thread(target=lambda: got.append(install_handlers((signal.SIGUSR2,), lambda s, f: None)))
    thread.start()
    thread.join()
    assert got == [{}] and signal.getsignal(signal.SIGUSR2) == before
