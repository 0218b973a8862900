"""sessions.py: named chat sessions on disk (names, the one-chat lock, damaged files, listing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from parsl_chat.errors import ConfigError, UsageError
from parsl_chat.io.sessions import SessionStore, list_sessions, sessions_dir


def test_names_are_checked_and_the_error_says_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        SessionStore("../etc/passwd", folder=tmp_path)
    assert "invalid session name" in str(caught.value) and "letters, digits" in (caught.value.hint or "")
    assert SessionStore("run-2.b_c", folder=tmp_path).path == tmp_path / "run-2.b_c.json"


def test_a_session_is_open_in_one_chat_at_a_time(tmp_path: Path) -> None:
    first, second = SessionStore("s", folder=tmp_path), SessionStore("s", folder=tmp_path)
    first.acquire()
    try:
        with pytest.raises(UsageError) as caught:
            second.acquire()
        assert f"pid {os.getpid()}" in str(caught.value)
    finally:
        first.release()
    second.acquire()  # free again once the first chat is gone
    second.release()


def test_saved_sessions_load_and_a_damaged_one_says_so(tmp_path: Path) -> None:
    store = SessionStore("s", folder=tmp_path)
    assert store.load() is None
    turn = {"n": 1, "agent": "a", "conversation": "c", "prompt": "p", "response": "r", "at": ""}
    store.save({"turns": [turn], "updated_at": "2026-11-30T10:00:00+00:00"})
    assert store.load() == {"turns": [turn], "updated_at": "2026-11-30T10:00:00+00:00"}
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed
    store.path.write_text('{"turns": [{"n": "one"}]}')
    with pytest.raises(ConfigError) as caught:
        store.load()
    assert str(store.path) in str(caught.value) and "damaged" in str(caught.value)


def test_list_sessions_newest_first_with_damaged_files_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    folder = sessions_dir()
    assert folder == tmp_path / "parsl-chat" / "sessions" and list_sessions() == []
    folder.mkdir(parents=True)
    turns = [{"agent": "a"}, {"agent": "b"}, {"agent": "a"}]
    (folder / "old.json").write_text(json.dumps({"turns": turns[:1], "updated_at": "2026-01-01"}))
    (folder / "new.json").write_text(json.dumps({"turns": turns, "updated_at": "2026-11-30"}))
    (folder / "bad.json").write_text("{")
    found = {s.name: s for s in list_sessions()}
    # by updated_at, newest first; "damaged" sorts above any date
    assert [s.name for s in list_sessions()][:2] == ["bad", "new"]
    assert (found["new"].turns, found["new"].agents) == (3, 2) and (found["old"].turns, found["old"].agents) == (1, 1)
    assert (found["bad"].turns, found["bad"].updated_at) == (-1, "damaged")
