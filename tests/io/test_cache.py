"""The response cache: re-runs send only what changed, many writers lose nothing, damage is skipped.

Most tests drive the real CLI against the simulated endpoint and read its request log:
a hit must send nothing. The library tests below them pin down the file format's
guarantees (torn tails, concurrent writers, compaction under readers).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import run_cli

from parsl_chat.config import CacheConfig
from parsl_chat.io import cache

#: Columns that differ between any two runs of the same prompts, cache or not: when and where a
#: row was made, and how many requests it took (a hit took none: attempts 0, latency_s empty).
PER_RUN = {
    "submitted_at", "started_at", "finished_at", "queue_s", "latency_s", "attempts",
    "hostname", "node", "worker", "block", "job_id",
}  # fmt: skip
CACHE_COLUMNS = {"cached", "cached_from", "cached_at", "cached_latency_s"}


def _config(path: Path, temperature: float | None = 0.0, **cache_section: Any) -> Path:
    params = {} if temperature is None else {"temperature": temperature}
    text = {
        "agents": [
            {"name": "analyst", "system_prompt": "Be careful.", "params": params},
            {"name": "teacher", "system_prompt": "Be simple.", "params": params},
        ],
        "limits": {"concurrency": 4},
        "server": {"kind": "none"},
    }
    if cache_section:
        text["cache"] = cache_section
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def _prompts(path: Path, n: int, changed: set[int] = frozenset(), prefix: str = "q") -> Path:  # type: ignore[assignment]
    lines = []
    for i in range(n):
        text = f"question number {i}" + (" (reworded)" if i in changed else "")
        lines.append(json.dumps({"id": f"{prefix}{i}", "prompt": text}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(prompts: Path, out: Path, server: Any, config: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    result = run_cli(
        "run", str(prompts), "--config", str(config), "--endpoint", server.url, "--model", "sim", "--out", str(out), *extra,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def _sent(server: Any, since: int) -> list[str]:
    return [r["prompt"] for r in server.requests()[since:]]


def _results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").sort_values("custom_id").reset_index(drop=True)


# --------------------------------------------------------------------------- the CLI


def test_rerun_with_10_percent_changed_sends_exactly_those_and_matches_an_uncached_run(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    config = _config(tmp_path / "agents.yaml")
    store = tmp_path / "cache"
    n = 200
    changed = set(range(3, n, 10))  # 20 prompts, spread over the file and both agents
    _run(_prompts(tmp_path / "first.jsonl", n), tmp_path / "first", server, config, "--cache", str(store))
    assert len(server.requests()) == n

    before = len(server.requests())
    again = _prompts(tmp_path / "again.jsonl", n, changed)
    # the local profile without its warm start: every lookup on a Parsl worker process
    _run(again, tmp_path / "cached", server, config, "--cache", str(store), env={"PARSL_CHAT_WARM_START": "0"})
    assert sorted(_sent(server, before)) == sorted(f"question number {i} (reworded)" for i in changed)

    before = len(server.requests())
    _run(again, tmp_path / "uncached", server, config, "--no-parsl")
    assert len(_sent(server, before)) == n  # no cache: everything is sent

    cached, uncached = _results(tmp_path / "cached"), _results(tmp_path / "uncached")
    same = [c for c in cached.columns if c not in PER_RUN | CACHE_COLUMNS]
    assert {"custom_id", "agent", "model", "endpoint", "response", "prompt_tokens", "completion_tokens"} <= set(same)
    pd.testing.assert_frame_equal(cached[same], uncached[same])

    assert cached.worker.str.contains("/w").all()  # Parsl worker ranks: looked up on the workers
    hits = cached.cached.astype(bool)
    assert hits.sum() == n - len(changed)
    assert set(cached.loc[~hits, "custom_id"]) == {f"q{i}" for i in changed}
    assert (cached.loc[hits, "attempts"] == 0).all() and cached.loc[hits, "latency_s"].isna().all()
    assert (cached.loc[hits, "cached_latency_s"] > 0).all() and cached.loc[hits, "cached_at"].notna().all()
    first_id = json.loads((tmp_path / "first" / "run.json").read_text())["run_id"]
    assert set(cached.loc[hits, "cached_from"]) == {first_id}
    assert (cached.loc[~hits, "cached"] == False).all()  # noqa: E712  asked and missed, not "not asked"
    assert uncached.cached.isna().all()

    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["cache"]["hits"] == n - len(changed) and summary["cache"]["misses"] == len(changed)
    assert summary["cache"]["hit_rate"] == pytest.approx(0.9)
    saved = cached.loc[hits]
    assert summary["cache"]["tokens_saved"]["completion"] == saved.completion_tokens.sum()
    # zero new tokens for a hit: the run's tokens are those of the 20 requests sent
    assert summary["tokens"]["completion"] == cached.loc[~hits, "completion_tokens"].sum()
    assert summary["tokens"]["prompt"] == cached.loc[~hits, "prompt_tokens"].sum()
    report = run_cli("report", str(tmp_path / "cached"))
    assert report.returncode == 0, report.stderr
    assert "cache hits" in report.stdout and "180" in report.stdout and "20 misses" in report.stdout


def test_conversations_are_answered_from_the_cache_turn_by_turn(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    config = _config(tmp_path / "agents.yaml")
    prompts = tmp_path / "conv.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"c{c}-t{t}", "conversation": f"c{c}", "prompt": f"conversation {c} turn {t}"}) + "\n"
            for c in range(5)
            for t in range(3)
        )
    )
    store = tmp_path / "cache"
    _run(prompts, tmp_path / "first", server, config, "--cache", str(store), "--no-parsl")
    before = len(server.requests())
    _run(prompts, tmp_path / "second", server, config, "--cache", str(store), "--no-parsl")
    assert _sent(server, before) == []
    first, second = _results(tmp_path / "first"), _results(tmp_path / "second")
    assert second.cached.all() and (first.response == second.response).all()


def test_sampled_answers_are_cached_only_when_asked_for(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    prompts = _prompts(tmp_path / "p.jsonl", 12)
    store = tmp_path / "cache"
    for name, temperature in (("warm", 0.7), ("unset", None)):
        config = _config(tmp_path / f"{name}.yaml", temperature)
        first = _run(prompts, tmp_path / f"{name}-1", server, config, "--cache", str(store), "--no-parsl")
        assert "neither looked up nor stored" in first.stderr
        before = len(server.requests())
        _run(prompts, tmp_path / f"{name}-2", server, config, "--cache", str(store), "--no-parsl")
        assert len(_sent(server, before)) == 12
        assert _results(tmp_path / f"{name}-2").cached.isna().all()  # not asked
    config = _config(tmp_path / "warm.yaml", 0.7)
    _run(prompts, tmp_path / "opt-in-1", server, config, "--cache", str(store), "--cache-sampled", "--no-parsl")
    before = len(server.requests())
    _run(prompts, tmp_path / "opt-in-2", server, config, "--cache", str(store), "--cache-sampled", "--no-parsl")
    assert _sent(server, before) == []


def test_read_mode_uses_the_cache_and_adds_nothing(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    config = _config(tmp_path / "agents.yaml")
    store = tmp_path / "cache"
    _run(_prompts(tmp_path / "a.jsonl", 10), tmp_path / "a", server, config, "--cache", str(store), "--no-parsl")
    more = _prompts(tmp_path / "b.jsonl", 15)
    env = {"PARSL_CHAT_CACHE_DIR": str(store), "PARSL_CHAT_CACHE_MODE": "read"}  # the environment layer
    before = len(server.requests())
    _run(more, tmp_path / "b", server, config, "--no-parsl", env=env)
    assert sorted(_sent(server, before)) == sorted(f"question number {i}" for i in range(10, 15))
    assert cache.stats(store).entries == 10
    shown = run_cli("config", "show", "--config", str(config), env=env)
    assert "environment variable" not in shown.stderr, shown.stderr
    lines = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip().startswith("cache.")}
    assert "env (PARSL_CHAT_CACHE_DIR)" in lines["cache.dir"] and "read" in lines["cache.mode"]


def test_the_yaml_cache_section_and_mode_off(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    store = tmp_path / "cache"
    config = _config(tmp_path / "agents.yaml", dir=str(store))
    prompts = _prompts(tmp_path / "p.jsonl", 8)
    _run(prompts, tmp_path / "a", server, config, "--no-parsl")
    assert cache.stats(store).entries == 8
    before = len(server.requests())
    _run(prompts, tmp_path / "b", server, config, "--no-parsl", "--cache-mode", "off")  # the option wins over YAML
    assert len(_sent(server, before)) == 8
    assert json.loads((tmp_path / "b" / "run.json").read_text())["cache"] is None
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["cache"] is None


def test_no_secret_reaches_the_cache_and_the_endpoint_is_not_in_the_key(sim_server, tmp_path: Path) -> None:
    one, other = sim_server(), sim_server()
    config = _config(tmp_path / "agents.yaml")
    store = tmp_path / "cache"
    prompts = _prompts(tmp_path / "p.jsonl", 10)
    secret = "sk-test-cache-0123456789abcdef"
    _run(prompts, tmp_path / "a", one, config, "--cache", str(store), "--no-parsl", env={"OPENAI_API_KEY": secret})
    _run(prompts, tmp_path / "b", other, config, "--cache", str(store), "--no-parsl", env={"OPENAI_API_KEY": "sk-other"})
    assert other.requests() == []  # another endpoint, another key: the same requests, all hits
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and one.url.encode() not in data and b"127.0.0.1" not in data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cache", "{file}"], "is a file"),
        (["--cache", "{full}"], "is not empty and not a parsl-chat cache"),
        (["--cache", "{new}", "--cache-mode", "read"], "is not a parsl-chat cache"),
    ],
)
def test_an_unusable_cache_directory_is_refused_before_anything_is_sent(
    sim_server, tmp_path: Path, args: list[str], message: str
) -> None:
    server = sim_server()
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("mine")
    places = {"file": tmp_path / "file", "full": tmp_path / "full", "new": tmp_path / "new"}
    argv = [a.format(**places) for a in args]
    result = run_cli(
        "run", str(_prompts(tmp_path / "p.jsonl", 3)), "--config", str(_config(tmp_path / "agents.yaml")),
        "--endpoint", server.url, "--model", "sim", "--out", str(tmp_path / "out"), "--no-parsl", *argv,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "option --cache" in result.stderr and "Traceback" not in result.stderr
    assert server.requests() == []
    assert not (tmp_path / "full" / "segments").exists()


def test_runs_creating_a_new_cache_at_the_same_moment_both_use_it(tmp_path: Path) -> None:
    """A job array starts together on a new cache: one run sees the other's half-made directory (segments/,
    the marker being written) and must join it, not refuse it as someone else's directory."""
    from parsl_chat.config import CacheConfig
    from parsl_chat.errors import ConfigError
    from parsl_chat.io.cache.directory import marker_ok, prepare

    root = tmp_path / "cache"
    (root / "segments").mkdir(parents=True)
    (root / ".parsl-chat-cache.json.1a2b3c4d.tmp").write_text("")  # the other run's marker, not yet in place
    ready = prepare(CacheConfig(dir=str(root)))
    assert ready is not None and marker_ok(root)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "segments").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file beside a 'segments' folder")
    with pytest.raises(ConfigError, match="is not empty and not a parsl-chat cache"):
        prepare(CacheConfig(dir=str(tmp_path / "mine")))


def test_a_bad_cache_mode_names_where_it_came_from(tmp_path: Path) -> None:
    result = run_cli("run", "x.jsonl", "--dry-run", env={"PARSL_CHAT_CACHE_MODE": "sometimes"})
    assert result.returncode == 2
    assert "PARSL_CHAT_CACHE_MODE" in result.stderr and "read_write, read, off" in result.stderr


def test_cache_commands(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    config = _config(tmp_path / "agents.yaml")
    store = tmp_path / "cache"
    _run(_prompts(tmp_path / "a.jsonl", 20), tmp_path / "a", server, config, "--cache", str(store), "--no-parsl")
    _run(_prompts(tmp_path / "b.jsonl", 30), tmp_path / "b", server, config, "--cache", str(store), "--no-parsl")
    shown = json.loads(run_cli("cache", "stats", str(store), "--json").stdout)
    assert shown["entries"] == 30 and shown["damaged_lines"] == 0 and shown["files"]["sealed"] == 2
    compacted = run_cli("cache", "compact", str(store))
    assert compacted.returncode == 0 and "merged 2 file(s)" in compacted.stdout and "30 entries" in compacted.stdout
    shown = json.loads(run_cli("cache", "stats", str(store), "--json").stdout)
    assert shown["entries"] == 30 and shown["files"] == {"open": 0, "sealed": 0, "compacted": 1}
    before = len(server.requests())
    _run(_prompts(tmp_path / "b.jsonl", 30), tmp_path / "c", server, config, "--cache", str(store), "--no-parsl")
    assert _sent(server, before) == []  # answered from the compacted file
    cleared = run_cli("cache", "clear", str(store))
    assert cleared.returncode == 0 and "removed 2 file(s)" in cleared.stdout
    assert json.loads(run_cli("cache", "stats", str(store), "--json").stdout)["entries"] == 0
    for command in ("stats", "compact", "clear"):
        refused = run_cli("cache", command, str(tmp_path / "a"))  # a run directory, not a cache
        assert refused.returncode == 2 and "not a parsl-chat cache" in refused.stderr, refused.stderr
    assert (tmp_path / "a" / "results.parquet").exists()


# --------------------------------------------------------------------------- the files


def _answer(i: int) -> dict[str, Any]:
    return {"model": "m", "response": f"answer {i}", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 5}


def _key(i: int) -> bytes:
    return cache.request_key({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "temperature": 0})


def _new_cache(tmp_path: Path) -> Path:
    prepared = cache.prepare(CacheConfig(dir=str(tmp_path / "cache")))
    assert prepared is not None and prepared.dir is not None
    return Path(prepared.dir)


def test_the_key_is_made_of_everything_that_shapes_the_answer() -> None:
    base = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "temperature": 0}
    assert cache.request_key(base) == cache.request_key(dict(reversed(list(base.items()))))  # key order does not matter
    variants = [
        {**base, "model": "other"},
        {**base, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]},
        {**base, "messages": [{"role": "user", "content": "u"}]},
        {**base, "temperature": 0.0001},
        {**base, "max_tokens": 10},
        {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    ]
    keys = {cache.request_key(v) for v in variants}
    assert len(keys) == len(variants) and cache.request_key(base) not in keys
    assert not cache.sampled(base) and cache.sampled({**base, "temperature": 0.2}) and cache.sampled({"model": "m"})


def test_a_torn_or_garbled_segment_is_skipped_and_compaction_drops_the_damage(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    writer = cache.Writer(root)
    for i in range(5):
        writer.append(cache.encode_line(_key(i), _answer(i)))
    writer.seal()
    segment = next((root / "segments").glob("*.seg"))
    whole = cache.encode_line(_key(5), _answer(5))
    good = cache.encode_line(_key(6), _answer(6))
    bad = bytearray(cache.encode_line(_key(7), _answer(7)))
    bad[-5] ^= 0x20  # one flipped bit inside the JSON: the CRC no longer matches
    with segment.open("ab") as fh:
        fh.write(bytes(bad) + b"\0" * 40 + b"\n" + good + whole[: len(whole) // 2])  # garbled, zeros, good, torn tail
    reader = cache.Reader(root)
    reader.refresh(force=True)
    assert [reader.get(_key(i)) is not None for i in range(8)] == [True] * 5 + [False, True, False]
    assert reader.get(_key(6))["response"] == "answer 6"  # type: ignore[index]
    figures = cache.stats(root)
    assert (figures.entries, figures.damaged) == (6, 3)
    done = cache.compact(root)
    assert done.entries == 6 and done.dropped == 3
    assert cache.stats(root).damaged == 0
    reader.refresh(force=True)
    assert reader.get(_key(6)) is not None and reader.get(_key(7)) is None


def test_an_open_segment_is_read_up_to_its_last_whole_line_and_again_when_it_grows(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    path = root / "segments" / "elsewhere-1-ab.open"
    line = cache.encode_line(_key(1), _answer(1))
    path.write_bytes(cache.encode_line(_key(0), _answer(0)) + line[:20])  # another node's write, half visible
    reader = cache.Reader(root)
    reader.refresh(force=True)
    assert reader.get(_key(0)) is not None and reader.get(_key(1)) is None
    path.write_bytes(path.read_bytes() + line[20:])
    reader.refresh(force=True)
    assert reader.get(_key(1)) is not None


def _write_many(root: str, worker: int, count: int) -> None:
    writer = cache.Writer(Path(root))
    for i in range(count):
        j = i if i % 2 else worker * count + i  # odd keys are written by every worker: duplicates
        writer.append(cache.encode_line(_key(j), _answer(j)))
        if i % 97 == 0:
            writer.seal()  # as the idle timer and ROLL_S do: a writer leaves many segments
    writer.seal()


def test_many_writers_at_once_lose_nothing_and_compaction_under_a_reader_loses_nothing(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    workers, count = 6, 400
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_write_many, args=(str(root), w, count)) for w in range(workers)]
    reader = cache.Reader(root)
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    expected = {j for w in range(workers) for i in range(count) for j in [i if i % 2 else w * count + i]}
    reader.refresh(force=True)
    assert all(reader.get(_key(j)) == _answer(j) for j in expected)
    figures = cache.stats(root)
    assert figures.entries == len(expected) and figures.records == workers * count and figures.damaged == 0
    cache.compact(root)
    assert sorted(p.suffix for p in (root / "segments").iterdir()) == [".idx", ".seg"]
    # the reader's files are gone: it finds the answers again in the compacted file
    assert all(reader.get(_key(j)) == _answer(j) for j in sorted(expected)[:50])
    reader.refresh(force=True)
    assert len(reader) == len(expected) and all(reader.get(_key(j)) == _answer(j) for j in expected)


def test_compaction_leaves_a_segment_being_written_alone(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    sealed = cache.Writer(root)
    sealed.append(cache.encode_line(_key(0), _answer(0)))
    sealed.seal()
    live = cache.Writer(root)
    live.append(cache.encode_line(_key(1), _answer(1)))
    done = cache.compact(root)
    assert done.left_open == 1 and done.merged_files == 1
    live.append(cache.encode_line(_key(2), _answer(2)))  # the writer goes on in its own file
    live.seal()
    reader = cache.Reader(root)
    reader.refresh(force=True)
    assert all(reader.get(_key(i)) == _answer(i) for i in range(3))
    assert cache.compact(root, idle_s=0).entries == 3


def test_an_abandoned_open_segment_is_compacted_once_idle(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    dead = root / "segments" / "node9-123-dead.open"
    dead.write_bytes(cache.encode_line(_key(0), _answer(0)))
    assert cache.compact(root).left_open == 1
    old = os.stat(dead).st_mtime - 3600
    os.utime(dead, (old, old))
    done = cache.compact(root)
    assert done.left_open == 0 and done.entries == 1 and not dead.exists()


def test_an_open_segment_of_a_process_of_this_host_that_ended_is_compacted_at_once(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    child = multiprocessing.get_context("spawn").Process(target=_write_many, args=(str(root), 0, 1))
    child.start()
    child.join(60)  # an ended process: its pid is free (a Parsl worker killed before it sealed)
    ended = root / "segments" / f"{socket.gethostname()}-{child.pid}-0000abcd.open"
    ended.write_bytes(cache.encode_line(_key(0), _answer(0)))
    alive = root / "segments" / f"{socket.gethostname()}-{os.getpid()}-0000abcd.open"
    alive.write_bytes(cache.encode_line(_key(1), _answer(1)))
    done = cache.compact(root)
    assert not ended.exists() and alive.exists() and done.left_open == 1


def test_an_open_segment_of_a_zombie_writer_is_compacted_at_once(tmp_path: Path) -> None:
    # kill(0) succeeds on a zombie; where PID 1 does not reap (some CI containers) an ended
    # worker stays one, and its last segment would wait for --idle-s
    root = _new_cache(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not end"
        time.sleep(0.05)
    zombie = root / "segments" / f"{socket.gethostname()}-{child.pid}-0000abcd.open"
    zombie.write_bytes(cache.encode_line(_key(0), _answer(0)))
    try:
        done = cache.compact(root)
    finally:
        child.wait()
    assert not zombie.exists() and done.left_open == 0 and done.entries == 1


def test_the_index_is_numpy_arrays_not_an_object_per_entry(tmp_path: Path) -> None:
    root = _new_cache(tmp_path)
    writer = cache.Writer(root)
    for i in range(2000):
        writer.append(cache.encode_line(_key(i), _answer(i)))
    writer.seal()
    cache.compact(root)
    reader = cache.Reader(root)
    reader.refresh(force=True)
    arrays = (reader.prefixes, reader.seconds, reader.numbers, reader.offsets)
    assert len(reader) == 2000 and sum(a.nbytes for a in arrays) == 2000 * 28
    assert reader.get(_key(1999)) == _answer(1999)
