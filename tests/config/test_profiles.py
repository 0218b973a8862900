"""backends/parsl.py: the Parsl backend's start-up."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from parsl_chat.backends.parsl import ParslBackend
from parsl_chat.config import load_settings


def test_the_first_block_is_launched_at_once_and_only_by_parsls_scaling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launching the first block from the starting thread raced Parsl's own scaling tick: two
    blocks went to SLURM where max_blocks was 1. One thread launches, and it does so at once."""
    from parsl.executors.status_handling import BlockProviderExecutor

    launches: list[tuple[str, int]] = []
    original = BlockProviderExecutor.scale_out_facade

    def recorded(self: Any, blocks: int) -> Any:
        launches.append((threading.current_thread().name, blocks))
        return original(self, blocks)

    monkeypatch.setattr(BlockProviderExecutor, "scale_out_facade", recorded)
    settings = load_settings("local", None, {"endpoint": "http://127.0.0.1:9/v1"})
    profile = replace(settings.profile, strategy_period_s=30.0)  # Parsl's next regular tick is far off
    backend = ParslBackend(profile, "test-run-0000abcd", tmp_path / "parsl")
    started = time.monotonic()
    backend.start()
    try:
        while not launches and time.monotonic() - started < 20:
            time.sleep(0.05)
        assert launches, "no block launched"
        assert time.monotonic() - started < 20  # not one strategy period (30 s) later
        time.sleep(0.5)
        assert len(launches) == 1 and launches[0][1] == profile.init_blocks, launches
        assert launches[0][0].startswith("JobStatusPoller"), launches
        assert backend._dfk.job_status_poller.interval == 30.0
    finally:
        backend.shutdown()
