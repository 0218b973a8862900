"""progress: plain lines in batch jobs, one per period and one at the end, never the same line twice."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from parsl_chat.progress import RunProgress


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("progress:")]


def test_a_batch_job_gets_a_closing_line(capsys: pytest.CaptureFixture[str]) -> None:
    with RunProgress(3, console=Console(file=io.StringIO()), interactive=False) as progress:
        progress.add(2, 1)
    (line,) = _lines(capsys)
    assert line.startswith("progress: 3/3 done, 1 failed, ") and line.endswith(" prompts/s, ETA -")


def test_the_closing_line_is_not_the_last_periodic_one_again(capsys: pytest.CaptureFixture[str]) -> None:
    with RunProgress(3, console=Console(file=io.StringIO()), interactive=False) as progress:
        progress.LOG_EVERY_S = 0.0  # every add logs
        progress.add(3, 0)
    assert len(_lines(capsys)) == 1
