"""rundir: the one reader and writer of run.json, strict for the run and cleanup, lenient for the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from parsl_chat.errors import OutputError
from parsl_chat.io.rundir import read_run_meta, run_meta_or_note, write_run_meta


def test_written_then_read_back(tmp_path: Path) -> None:
    write_run_meta(tmp_path, {"run_id": "r1", "status": "running"})
    assert read_run_meta(tmp_path) == {"run_id": "r1", "status": "running"}
    assert run_meta_or_note(tmp_path) == ({"run_id": "r1", "status": "running"}, None)


@pytest.mark.parametrize(
    ("text", "strict", "note"),
    [
        (None, "not a parsl-chat run directory (no run.json)", "run.json is missing"),
        ("{half", "unreadable run metadata", "unreadable run metadata"),
        ("[1, 2]", "not a JSON object", "not a JSON object"),
    ],
)
def test_a_missing_or_broken_run_json(tmp_path: Path, text: str | None, strict: str, note: str) -> None:
    if text is not None:
        (tmp_path / "run.json").write_text(text)
    with pytest.raises(OutputError, match=strict.replace("(", r"\(").replace(")", r"\)")):
        read_run_meta(tmp_path)
    meta, why = run_meta_or_note(tmp_path)
    assert meta == {} and why is not None and note in why and str(tmp_path) not in why
