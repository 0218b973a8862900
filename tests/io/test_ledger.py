"""Unit tests for parsl_chat.io.ledger: append/read, torn tails, the done index."""

from __future__ import annotations

import json
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parsl_chat.io.ledger import Ledger, LedgerIndex, digest_matches, id_hash, read_ledger


def rec(custom_id: str, status: str = "ok", digest: str | None = "00000000000000ab", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "status": status, "digest": digest, **extra}


def test_append_and_read(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    rows = [rec("a", response="héllo ☃"), rec("b", "error", error="boom\nline two")]
    with Ledger(path) as ledger:
        ledger.append(rows[:1])
        ledger.append([])  # nothing to write
        ledger.append(rows[1:])
        assert ledger.appended == 2
        assert repr(ledger) == f"Ledger({str(path)!r}, appended=2)"
    assert list(read_ledger(path)) == rows
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and text.endswith("\n")
    assert "héllo ☃" in text  # stored as UTF-8, not escaped
    assert ledger._fh is None


def test_append_is_visible_before_close(tmp_path: Path) -> None:
    """Flushed per append: a SIGKILLed driver keeps every record it appended."""
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path).open()
    try:
        ledger.append([rec("a")])
        assert [r["custom_id"] for r in read_ledger(path)] == ["a"]
    finally:
        ledger.close()
    ledger.close()  # closing twice is harmless


def test_append_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.append([rec("a")])
    with Ledger(path) as ledger:
        ledger.append([rec("b")])
        assert ledger.appended == 1
    assert [r["custom_id"] for r in read_ledger(path)] == ["a", "b"]


def test_append_requires_open(tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        Ledger(tmp_path / "l.jsonl").append([rec("a")])


def test_one_line_per_record_even_with_unicode_line_separators(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.append([rec("a", response="x\u2028y\u0085z\r\n")])
    assert path.read_bytes().count(b"\n") == 1
    assert next(read_ledger(path))["response"] == "x\u2028y\u0085z\r\n"


def test_read_missing_ledger(tmp_path: Path) -> None:
    assert list(read_ledger(tmp_path / "absent.jsonl")) == []


def test_torn_last_line_tolerated_on_read(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a","status":"ok"}\n{"custom_id":"b","sta')
    assert [r["custom_id"] for r in read_ledger(path)] == ["a"]


def test_complete_but_unparseable_last_line_ignored(tmp_path: Path) -> None:
    """A complete line that is not JSON (or is blank) is skipped, and reading goes on."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a"}\n{"custom_id":"b"\n\n{"custom_id":"c"}\n')
    assert [r["custom_id"] for r in read_ledger(path)] == ["a", "c"]


def test_torn_tail_without_newline_even_if_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a"}\n{"custom_id":"b"}')
    assert [r["custom_id"] for r in read_ledger(path)] == ["a"]


def test_open_repairs_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a","status":"ok"}\n{"custom_id":"b","sta')
    with Ledger(path) as ledger:
        ledger.append([rec("c")])
    assert path.read_bytes().startswith(b'{"custom_id":"a","status":"ok"}\n{"custom_id":"c"')
    assert [r["custom_id"] for r in read_ledger(path)] == ["a", "c"]


def test_open_repairs_torn_only_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a","sta')
    Ledger(path).open().close()
    assert path.read_bytes() == b""


def test_open_repairs_long_torn_tail(tmp_path: Path) -> None:
    """The newline before the torn record is further back than one read block."""
    path = tmp_path / "ledger.jsonl"
    head = b'{"custom_id":"a"}\n' * 1000
    path.write_bytes(head + b'{"custom_id":"b","response":"' + b"x" * 300_000)
    Ledger(path).open().close()
    assert path.read_bytes() == head


def test_open_repair_does_not_read_the_whole_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    record = json.dumps(rec("a", response="r" * 1000)).encode() + b"\n"
    with path.open("wb") as fh:
        for _ in range(30):
            fh.write(record * 1000)  # ~30 MB of complete records
        fh.write(b'{"custom_id":"torn"')
    size = path.stat().st_size
    tracemalloc.start()
    try:
        Ledger(path).open().close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == size - len(b'{"custom_id":"torn"')
    assert peak < 2_000_000, f"repair peaked at {peak / 1e6:.1f} MB"


def test_open_keeps_clean_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    data = b'{"custom_id":"a"}\n{"custom_id":"b"}\n'
    path.write_bytes(data)
    Ledger(path).open().close()
    assert path.read_bytes() == data
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    Ledger(empty).open().close()
    assert empty.read_bytes() == b""
    fresh = tmp_path / "fresh.jsonl"
    Ledger(fresh).open().close()
    assert fresh.exists()


def test_fsync_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl_chat.io.ledger as ledger_mod

    calls: list[int] = []
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: calls.append(fd))
    clock = iter([100.0, 100.1, 100.2, 101.5])
    monkeypatch.setattr(ledger_mod, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    ledger = Ledger(tmp_path / "l.jsonl").open()
    for name in "abcd":
        ledger.append([rec(name)])
    assert len(calls) == 2  # first append, then once a second has passed
    ledger.close()
    assert len(calls) == 3  # close always syncs


# --------------------------------------------------------------------------- index


def write_ledger(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_index_last_record_wins(tmp_path: Path) -> None:
    path = write_ledger(
        tmp_path / "ledger.jsonl",
        [
            rec("a", "error", digest="0000000000000001"),
            rec("b", "ok", digest="ffffffffffffffff"),
            rec("a", "ok", digest="0000000000000002"),
            rec("c", "ok"),
            rec("c", "error", digest=None),
        ],
    )
    index = LedgerIndex.load(path)
    assert index.records == 5
    assert len(index) == 3
    assert index.lookup("a") == (True, 2)
    assert index.lookup("b") == (True, 0xFFFFFFFFFFFFFFFF)
    assert index.lookup("c") == (False, 0)
    assert index.lookup("d") is None
    assert index.failed == 1
    assert index.ids.dtype == np.uint64 and list(index.ids) == sorted(index.ids)


def test_index_many_ids(tmp_path: Path) -> None:
    rows = [rec(f"q{i}", "ok" if i % 3 else "error", digest=f"{i:016x}") for i in range(2000)]
    rows += [rec(f"q{i}", "ok", digest=f"{i + 1:016x}") for i in range(0, 2000, 3)]  # the failures were retried
    index = LedgerIndex.load(write_ledger(tmp_path / "ledger.jsonl", rows))
    assert len(index) == 2000
    assert index.failed == 0
    assert index.lookup("q3") == (True, 4)
    assert index.lookup("q4") == (True, 4)
    assert index.lookup("q2000") is None


def test_index_empty_and_missing(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.jsonl", write_ledger(tmp_path / "empty.jsonl", [])):
        index = LedgerIndex.load(path)
        assert len(index) == 0 and index.records == 0 and index.failed == 0
        assert index.lookup("a") is None


def test_index_ignores_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"custom_id":"a","status":"error"}\n{"custom_id":"a","status":"ok"')
    index = LedgerIndex.load(path)
    assert index.lookup("a") == (False, 0)


def test_id_hash_stable() -> None:
    assert id_hash("a") == id_hash("a") != id_hash("b")
    assert 0 <= id_hash("x") < 2**64
    # scan (duplicate ids) and the resume's index use this one function: they cannot disagree


def test_digest_matches() -> None:
    assert digest_matches(0, "00000000000000ab")  # no digest recorded: anything matches
    assert digest_matches(0, None)
    assert digest_matches(0xAB, "00000000000000ab")
    assert not digest_matches(0xAB, "00000000000000ac")
    assert not digest_matches(0xAB, None)


def test_digest_matches_prompt_digest(tmp_path: Path) -> None:
    from parsl_chat.io.prompts import Prompt

    prompt = Prompt(custom_id="a", line=1, messages=({"role": "user", "content": "x"},))
    changed = Prompt(custom_id="a", line=1, messages=({"role": "user", "content": "y"},))
    path = write_ledger(tmp_path / "ledger.jsonl", [rec("a", digest=prompt.digest)])
    found = LedgerIndex.load(path).lookup("a")
    assert found is not None
    assert digest_matches(found[1], prompt.digest)
    assert not digest_matches(found[1], changed.digest)
