"""parsl_chat.analysis against run directories whose numbers are worked out by hand.

The reference run (``known_run``) is small enough that every expected value
below is computed in the comment next to it, from the row table, not by the
code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from runfactory import iso, make_run, row, run_meta, synthetic_run

from parsl_chat.analysis import (
    RESULT_COLUMNS,
    busy_union_s,
    compare,
    load_run,
    normalize,
    summarize,
    summarize_run,
    write_summary,
)
from parsl_chat.errors import UsageError

approx = pytest.approx

# Reference rows.  Times are seconds after T0; the run spans 0 -> 10 s.
#   id  agent node worker block submit start lat  end  status          attempts tokens(p/c)
#   p1  a     n1   w0     0     0      1     2    3    ok              1        10/20
#   p2  b     n1   w1     0     0      2     4    6    ok              1        10/40
#   p3  a     n2   w0     1     0      3     1    4    ok              1        30/10
#   p4  b     n2   w0     1     1      5     3    8    error timeout   3        -
#   p5  a     n1   w0     0     1      7     2    9    ok              2        20/30
#   p6  b     -    -      -     0      -     -    -    error invalid   1        -
# Agents a and b have concurrency 2 each: 4 agent slots.
# Block 0 (job 101, node n1) submitted at -4 s, still running at the end.
# Block 1 (job 102, node n2) submitted at -1 s, ended at 9 s.
KNOWN_ROWS = [
    row("p1", agent="a", node="n1", worker="w0", block="0", job_id="101", start=1, latency=2,
        prompt_tokens=10, completion_tokens=20),
    row("p2", agent="b", node="n1", worker="w1", block="0", job_id="101", start=2, latency=4,
        prompt_tokens=10, completion_tokens=40),
    row("p3", agent="a", node="n2", worker="w0", block="1", job_id="102", start=3, latency=1,
        prompt_tokens=30, completion_tokens=10),
    row("p4", agent="b", node="n2", worker="w0", block="1", job_id="102", submit=1, start=5, latency=3,
        status="error", error_type="timeout", attempts=3),
    row("p5", agent="a", node="n1", worker="w0", block="0", job_id="101", submit=1, start=7, latency=2, attempts=2,
        prompt_tokens=20, completion_tokens=30),
    row("p6", agent="b", node=None, worker=None, block=None, start=None, latency=None,
        status="error", error_type="invalid_input"),
]  # fmt: skip
KNOWN_BLOCKS = [
    {"block": "0", "job_id": "101", "submitted_at": iso(-4), "ended_at": None, "nodes": ["n1"], "cores_per_node": 8},
    {"block": "1", "job_id": "102", "submitted_at": iso(-1), "ended_at": iso(9), "nodes": ["n2"], "cores_per_node": 8},
]


def known_run(tmp_path: Path, **meta: Any) -> Path:
    run = run_meta("known", blocks=KNOWN_BLOCKS, **meta)
    return make_run(tmp_path / "known", KNOWN_ROWS, run)


def linear_percentile(values: list[float], q: float) -> float:
    """Percentile by linear interpolation between closest ranks, written out by hand."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------- loading


def test_load_run_reads_results_and_metadata(tmp_path: Path) -> None:
    run_dir = known_run(tmp_path)
    df = load_run(run_dir)
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert len(df) == 6
    assert df.attrs["run"]["run_id"] == "known"
    assert df.attrs["run_dir"] == str(run_dir)
    assert df.attrs["source"] == "results.parquet"
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"
    assert df.loc[df["custom_id"] == "p6", "started_at"].isna().all()
    assert df["attempts"].tolist() == [1, 1, 1, 3, 2, 1]


def test_load_run_rejects_paths_that_are_not_run_directories(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope") as info:
        load_run(missing)
    assert "no such run directory" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"results\.parquet") as info:
        load_run(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="file"):
        load_run(tmp_path / "file.txt")


def test_ledger_only_run_tolerates_torn_line_and_duplicates(tmp_path: Path) -> None:
    # The crash left: p1..p3 recorded, p4 recorded twice (a failed attempt, then the retry that
    # succeeded: the last record wins) and half a line.
    first_p4 = row("p4", agent="b", node="n2", start=5, latency=3, status="error", error_type="server_error")
    final_p4 = row("p4", agent="b", node="n2", start=5, latency=3, attempts=2, prompt_tokens=7, completion_tokens=9)
    ledger_rows = [KNOWN_ROWS[0], KNOWN_ROWS[1], first_p4, KNOWN_ROWS[2], final_p4]
    run = run_meta("crashed", finish=None, status="interrupted")
    run_dir = make_run(tmp_path / "crashed", [], run, results=False, ledger=True, ledger_rows=ledger_rows, torn=True)
    df = load_run(run_dir)
    assert df.attrs["source"] == "ledger.jsonl"
    assert sorted(df["custom_id"]) == ["p1", "p2", "p3", "p4"]
    p4 = df[df["custom_id"] == "p4"].iloc[0]
    assert p4["status"] == "ok" and p4["completion_tokens"] == 9
    assert str(df["finished_at"].dtype) == "datetime64[us, UTC]"
    assert any("unreadable line" in note for note in df.attrs["notes"])
    summary = summarize(df)
    assert summary["run"]["partial"] is True
    assert summary["counts"] == {
        "prompts": 4, "ok": 4, "error": 0, "errors_by_type": {}, "retried": 1, "not_started": 0, "unfinished": 0,
    }  # fmt: skip
    # No finished_at in run.json: the wall clock ends at the last finished request (p4: 5 + 3 = 8 s).
    assert summary["wall_s"] == approx(8.0)
    assert summary["wall"]["basis"] == "run.json started_at -> last finished_at"
    assert any("interrupted" in note for note in summary["run"]["notes"])


def test_ledger_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import parsl_chat.report.load as load

    monkeypatch.setattr(load, "LEDGER_CHUNK", 2)
    retried = row("p1", start=4, latency=1, attempts=2, completion_tokens=99)
    ledger_rows = [*KNOWN_ROWS[:5], retried]  # p1's later record lands in another chunk
    run_dir = make_run(tmp_path / "r", [], run_meta("r"), results=False, ledger=True, ledger_rows=ledger_rows)
    df = load_run(run_dir)
    assert df["custom_id"].tolist() == ["p1", "p2", "p3", "p4", "p5"]  # line order
    assert df.loc[0, "completion_tokens"] == 99


def test_csv_fallback_matches_parquet(tmp_path: Path) -> None:
    run_dir = known_run(tmp_path)
    from_parquet = summarize(load_run(run_dir))
    (run_dir / "results.parquet").unlink()
    df = load_run(run_dir)
    assert df.attrs["source"] == "results.csv"
    from_csv = summarize(df)
    for key in ("counts", "wall_s", "latency_s", "queue_s", "parallel_efficiency", "nodes", "allocation", "tokens"):
        assert from_csv[key] == from_parquet[key], key


def test_empty_run(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "empty", [], run_meta("empty", finish=None, status="running"), results=False)
    df = load_run(run_dir)
    assert len(df) == 0 and list(df.columns) == list(RESULT_COLUMNS)
    summary = summarize(df)
    json.dumps(summary)
    assert summary["counts"]["prompts"] == 0
    assert summary["wall_s"] is None
    assert summary["latency_s"] is None and summary["queue_s"] is None
    assert summary["throughput"]["prompts_per_s"] is None
    assert summary["parallel_efficiency"] is None
    assert summary["nodes"] == [] and summary["workers"] == [] and summary["slowest"] == []
    assert [a["prompts"] for a in summary["agents"]] == [0, 0]
    # an empty results.parquet (schema, no rows) too
    run_dir2 = make_run(tmp_path / "empty2", [], run_meta("empty2"))
    summary2 = summarize(load_run(run_dir2))
    assert summary2["counts"]["prompts"] == 0 and summary2["wall_s"] == 10.0
    assert summary2["parallel_efficiency"] == 0.0


def test_all_failed_run(tmp_path: Path) -> None:
    rows = [
        row(f"p{i}", start=i, latency=0.5, status="error", error_type=kind)
        for i, kind in enumerate(["rate_limit", "rate_limit", "auth", "server_error"])
    ]
    summary = summarize(load_run(make_run(tmp_path / "failed", rows, run_meta("failed", status="failed"))))
    assert summary["counts"]["ok"] == 0 and summary["counts"]["error"] == 4
    assert summary["counts"]["errors_by_type"] == {"auth": 1, "rate_limit": 2, "server_error": 1}
    assert summary["latency_s"] is None
    assert summary["throughput"]["ok_per_s"] == 0.0
    assert summary["tokens"]["total"] == 0
    # failed requests still held their slots: 4 x 0.5 s over 4 slots x 10 s
    assert summary["parallel_efficiency"] == approx(2.0 / 40.0)
    assert [e["error_type"] for e in summary["errors"]] == ["rate_limit", "auth", "server_error"]


def test_normalize_accepts_ledger_style_values() -> None:
    df = pd.DataFrame([{"custom_id": "x", "block": 0, "attempts": "2", "started_at": "2024-05-01T12:00:00Z", "latency_s": "1.5"}])
    out = normalize(df)
    assert list(out.columns) == list(RESULT_COLUMNS)
    assert out.loc[0, "block"] == "0"
    assert out.loc[0, "attempts"] == 2
    assert out.loc[0, "latency_s"] == 1.5
    assert out.loc[0, "started_at"] == pd.Timestamp("2024-05-01T12:00:00Z")


# --------------------------------------------------------------------------- summary


@pytest.fixture()
def known(tmp_path: Path) -> dict[str, Any]:
    return summarize(load_run(known_run(tmp_path, cost={"su_per_node_hour": 3.6})))


def test_summary_is_json_and_counts(known: dict[str, Any]) -> None:
    assert json.loads(json.dumps(known)) == known
    assert known["counts"] == {
        "prompts": 6,
        "ok": 4,
        "error": 2,
        "errors_by_type": {"invalid_input": 1, "timeout": 1},
        "retried": 2,  # p4 (3 attempts), p5 (2)
        "not_started": 1,  # p6
        "unfinished": 0,  # run.json says none (an interrupted run says how many)
    }
    assert known["run"]["run_id"] == "known" and known["run"]["partial"] is False


def test_writing_summary_json_imports_no_matplotlib() -> None:
    # the pipeline writes summary.json through parsl_chat.report: its plotting half loads on first use
    import subprocess
    import sys

    code = (
        "import sys; from parsl_chat.report import write_summary; from parsl_chat.analysis import compare, load_run;"
        " print('matplotlib' in sys.modules); from parsl_chat.report import write_html; print('matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_summary_sections_are_those_of_the_typed_dict_in_order(known: dict[str, Any]) -> None:
    from parsl_chat.report import Summary

    assert list(known) == list(Summary.__annotations__)


def test_failed_status_is_a_finished_run_not_a_partial_one(tmp_path: Path) -> None:
    # 'failed' = every prompt recorded, more of them failed than --max-failures allows
    summary = summarize(load_run(known_run(tmp_path, status="failed")))
    assert summary["run"]["partial"] is False
    assert summary["run"]["notes"] == [
        "run status is 'failed': 2 of 6 prompts failed, more than --max-failures allows; every prompt is recorded"
    ]


def test_wall_throughput_tokens(known: dict[str, Any]) -> None:
    assert known["wall_s"] == approx(10.0)
    assert known["wall"]["basis"] == "run.json started_at -> run.json finished_at"
    assert known["throughput"]["prompts_per_s"] == approx(6 / 10)
    assert known["throughput"]["ok_per_s"] == approx(4 / 10)
    assert known["tokens"] == {"prompt": 70, "completion": 100, "total": 170, "mean_completion_per_ok": approx(25.0)}
    assert known["throughput"]["completion_tokens_per_s"] == approx(100 / 10)
    assert known["throughput"]["total_tokens_per_s"] == approx(170 / 10)


def test_latency_and_queue(known: dict[str, Any]) -> None:
    ok_latencies = [2.0, 4.0, 1.0, 2.0]  # p1 p2 p3 p5
    lat = known["latency_s"]
    assert lat["n"] == 4
    assert lat["p50"] == approx(2.0)
    assert lat["p95"] == approx(3.7)  # 2 + 0.85 x (4 - 2)
    assert lat["p99"] == approx(3.94)
    assert lat["p95"] == approx(linear_percentile(ok_latencies, 95))
    assert lat["mean"] == approx(2.25) and lat["max"] == 4.0 and lat["min"] == 1.0
    queue = known["queue_s"]  # start - submit: 1, 2, 3, 4, 6
    assert queue["n"] == 5
    assert queue["p50"] == approx(3.0)
    assert queue["p95"] == approx(5.6)  # 4 + 0.8 x (6 - 4)
    assert queue["max"] == approx(6.0) and queue["mean"] == approx(3.2)


def test_parallel_efficiency_and_agents(known: dict[str, Any]) -> None:
    assert known["busy_agent_s"] == approx(12.0)  # 2 + 4 + 1 + 3 + 2
    assert known["agent_slots"] == 4
    assert known["parallel_efficiency"] == approx(12.0 / (4 * 10.0))
    agents = {a["agent"]: a for a in known["agents"]}
    assert list(agents) == ["a", "b"]
    a, b = agents["a"], agents["b"]
    assert (a["prompts"], a["ok"], a["error"], a["busy_s"]) == (3, 3, 0, approx(5.0))
    assert (b["prompts"], b["ok"], b["error"], b["busy_s"]) == (3, 1, 2, approx(7.0))
    assert a["utilisation"] == approx(5.0 / (2 * 10.0))
    assert b["utilisation"] == approx(7.0 / (2 * 10.0))
    assert a["completion_tokens_per_s"] == approx(60 / 10) and b["completion_tokens_per_s"] == approx(40 / 10)
    assert a["latency_p50_s"] == approx(2.0) and b["latency_p50_s"] == approx(4.0)


def test_nodes_and_workers(known: dict[str, Any]) -> None:
    nodes = {n["node"]: n for n in known["nodes"]}
    assert list(nodes) == ["n1", "n2"]  # p6 never reached a node
    n1, n2 = nodes["n1"], nodes["n2"]
    assert (n1["prompts"], n1["busy_s"], n1["workers"]) == (3, approx(8.0), 2)
    assert (n2["prompts"], n2["busy_s"], n2["workers"]) == (2, approx(4.0), 1)
    assert n1["share_prompts"] == approx(3 / 5) and n2["share_prompts"] == approx(2 / 5)
    assert n1["share_busy"] == approx(8 / 12) and n2["share_busy"] == approx(4 / 12)
    # union of request intervals: n1 [1,3] u [2,6] u [7,9] = 5 + 2; n2 [3,4] u [5,8] = 1 + 3
    assert n1["active_s"] == approx(7.0) and n2["active_s"] == approx(4.0)
    assert n1["active_fraction"] == approx(0.7)
    assert n1["hostnames"] == ["n1.cluster"]
    workers = {(w["node"], w["worker"]): w for w in known["workers"]}
    assert set(workers) == {("n1", "w0"), ("n1", "w1"), ("n2", "w0")}
    assert workers[("n1", "w0")]["busy_s"] == approx(4.0)  # p1 + p5
    assert workers[("n1", "w0")]["prompts"] == 2
    assert workers[("n2", "w0")]["error"] == 1
    assert all(w["utilisation"] == approx(0.4) for w in workers.values())


def test_allocation(known: dict[str, Any]) -> None:
    alloc = known["allocation"]
    assert alloc["job_ids"] == ["101", "102"]
    assert alloc["nodes"] == ["n1", "n2"]
    b0, b1 = alloc["blocks"]
    # block 0: first request started at 1 s, no ended_at -> run end 10 s; submitted at -4 s
    assert b0["start_basis"] == "first request started_at" and b0["end_basis"] == "run end"
    assert b0["duration_s"] == approx(9.0) and b0["allocated_node_s"] == approx(9.0)
    assert b0["queue_wait_s"] == approx(5.0)
    assert b0["prompts"] == 3
    # block 1: first request at 3 s, ended at 9 s; submitted at -1 s
    assert b1["duration_s"] == approx(6.0) and b1["queue_wait_s"] == approx(4.0)
    per_node = {n["node"]: n for n in alloc["per_node"]}
    assert per_node["n1"] == {"node": "n1", "allocated_s": approx(9.0), "busy_s": approx(7.0), "idle_s": approx(2.0)}
    assert per_node["n2"] == {"node": "n2", "allocated_s": approx(6.0), "busy_s": approx(4.0), "idle_s": approx(2.0)}
    assert alloc["node_s_allocated"] == approx(15.0)
    assert alloc["node_s_busy"] == approx(11.0)
    assert alloc["node_s_idle"] == approx(4.0)
    assert alloc["busy_fraction"] == approx(11 / 15)


def test_block_started_at_wins_over_first_request(tmp_path: Path) -> None:
    blocks = [dict(KNOWN_BLOCKS[0], started_at=iso(0.5)), KNOWN_BLOCKS[1]]
    summary = summarize(load_run(make_run(tmp_path / "r", KNOWN_ROWS, run_meta("r", blocks=blocks))))
    b0 = summary["allocation"]["blocks"][0]
    assert b0["start_basis"] == "block started_at"
    assert b0["duration_s"] == approx(9.5)
    assert b0["queue_wait_s"] == approx(5.0)  # still first request - submitted


def test_cost_su_from_allocation(known: dict[str, Any]) -> None:
    cost = known["cost"]
    assert cost["unit"] == "SU"
    assert cost["node_hours"] == approx(15 / 3600)
    assert cost["su"] == approx(3.6 * 15 / 3600)  # 0.015
    assert cost["su_per_1m_tokens"] == approx(0.015 / 170 * 1e6)
    assert cost["su_per_1k_ok_prompts"] == approx(0.015 * 1000 / 4)


def test_cost_su_without_allocation_and_usd(tmp_path: Path) -> None:
    su_run = make_run(tmp_path / "su", KNOWN_ROWS, run_meta("su", cost={"su_per_node_hour": 3.6}))
    su = summarize(load_run(su_run))
    assert su["allocation"] is None
    assert su["cost"]["basis"] == "wall hours x 2 node(s) seen"
    assert su["cost"]["su"] == approx(3.6 * 10 / 3600 * 2)
    usd_cost = {"usd_per_1m_prompt_tokens": 2.0, "usd_per_1m_completion_tokens": 6.0}
    usd = summarize(load_run(make_run(tmp_path / "usd", KNOWN_ROWS, run_meta("usd", cost=usd_cost))))
    assert usd["cost"]["unit"] == "USD"
    assert usd["cost"]["usd"] == approx(70 / 1e6 * 2 + 100 / 1e6 * 6)
    assert usd["cost"]["usd_per_1m_tokens"] == approx((70 / 1e6 * 2 + 100 / 1e6 * 6) / 170 * 1e6)
    none = summarize(load_run(make_run(tmp_path / "none", KNOWN_ROWS, run_meta("none"))))
    assert none["cost"] is None


def test_slowest_and_errors(known: dict[str, Any]) -> None:
    assert [(s["custom_id"], s["latency_s"]) for s in known["slowest"]] == [
        ("p2", 4.0), ("p4", 3.0), ("p1", 2.0), ("p5", 2.0), ("p3", 1.0),
    ]  # fmt: skip
    assert known["slowest"][1]["status"] == "error" and known["slowest"][1]["agent"] == "b"
    assert {e["error_type"]: e["count"] for e in known["errors"]} == {"timeout": 1, "invalid_input": 1}
    assert known["errors"][0]["example"].startswith("invalid_input") or known["errors"][0]["example"].startswith("timeout")


def test_wall_from_rows_when_run_json_has_no_times(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "r", KNOWN_ROWS, run_meta("r", start=None, finish=None))
    summary = summarize(load_run(run_dir))
    # first submitted_at (0 s) -> last finished_at (p5: 9 s)
    assert summary["wall_s"] == approx(9.0)
    assert summary["wall"]["basis"] == "first submitted_at -> last finished_at"


def test_summarize_frame_without_attrs() -> None:
    df = pd.DataFrame(KNOWN_ROWS)
    summary = summarize(df)
    assert summary["counts"]["prompts"] == 6
    assert summary["wall_s"] == approx(9.0)
    assert summary["agent_slots"] is None and summary["parallel_efficiency"] is None
    assert summary["allocation"] is None


def test_write_summary_matches_summarize(tmp_path: Path) -> None:
    run_dir = known_run(tmp_path)
    path = write_summary(run_dir)
    assert path == run_dir / "summary.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(summarize(load_run(run_dir))))


def test_summarize_run_reads_compactly_and_agrees(tmp_path: Path) -> None:
    """summary.json comes from a compact read (labels as categories, ids and errors only where shown);
    it must give exactly what summarize(load_run(...)) gives, across row groups, ties and odd rows."""
    import pyarrow.parquet as pq

    rows = [
        row(f"q{i:03d}", agent="abc"[i % 3], node=None if i % 11 == 0 else f"n{i % 4}", worker=f"w{i % 5}",
            block=str(i % 2), job_id=str(100 + i % 2), start=i * 0.1, latency=[1.0, 2.5, 2.5, 0.5][i % 4],
            status="error" if i % 7 == 0 else "ok", error_type=[None, "timeout", "server_error"][i % 3] if i % 7 == 0 else None,
            attempts=1 + i % 3)
        for i in range(120)
    ]  # fmt: skip
    rows.append(row("unplaced", node=None, worker=None, block=None, start=None, latency=None, status="error",
                    error_type="invalid_input"))  # fmt: skip
    run_dir = make_run(tmp_path / "r", rows, run_meta("r", blocks=KNOWN_BLOCKS, cost={"su_per_node_hour": 2.0}))
    parquet = run_dir / "results.parquet"
    pq.write_table(pq.read_table(parquet), parquet, row_group_size=16)  # several row groups, as a big run has
    assert pq.ParquetFile(parquet).metadata.num_row_groups > 5
    compact = summarize_run(run_dir)
    assert compact == json.loads(json.dumps(summarize(load_run(run_dir))))
    assert [e["error_type"] for e in compact["errors"]] and all(e["example"] for e in compact["errors"])
    assert len(compact["slowest"]) == 5 and {s["latency_s"] for s in compact["slowest"]} == {2.5}


def test_summarize_run_agrees_with_many_groups_and_wide_counts(tmp_path: Path) -> None:
    """More node x worker pairs than rows (grouping numbers the pairs present) and token counts beyond
    32 bits (held as Int64; attempts fit a byte): the compact read still gives what load_run gives."""
    rows = [
        row(f"q{i:03d}", node=f"n{i % 47}", worker=f"w{(i * 7) % 43}", start=(i % 9) * 0.5, latency=1.0 + i % 3,
            prompt_tokens=3_000_000_000 + i, completion_tokens=i, attempts=1 + i % 2)
        for i in range(90)
    ]  # fmt: skip
    run_dir = make_run(tmp_path / "r", rows, run_meta("r"))
    compact = summarize_run(run_dir)
    assert compact == json.loads(json.dumps(summarize(load_run(run_dir))))
    assert compact["tokens"]["prompt"] == 90 * 3_000_000_000 + sum(range(90))
    assert len(compact["workers"]) == len({(f"n{i % 47}", f"w{(i * 7) % 43}") for i in range(90)})


def test_union_by_group_matches_busy_union_per_group() -> None:
    import numpy as np

    from parsl_chat.report.intervals import union_by_group

    rng = np.random.default_rng(3)
    n = 400
    keys = pd.Series(rng.choice(["a", "b", "c"], n))
    keys[::37] = None  # missing keys are grouped as "unknown"
    start = rng.uniform(0, 50, n)
    end = start + rng.uniform(-0.5, 3, n)  # some end before they start: ignored
    start[::29] = np.nan
    stamps = pd.Timestamp("2026-01-01", tz="UTC")
    started = stamps + pd.to_timedelta(pd.Series(start), unit="s")
    finished = stamps + pd.to_timedelta(pd.Series(end), unit="s")
    union = union_by_group(keys, started, finished)
    epoch_start = (started - stamps).dt.total_seconds().to_numpy()
    epoch_end = (finished - stamps).dt.total_seconds().to_numpy()
    for name in ("a", "b", "c", "unknown"):
        mask = (keys.fillna("unknown") == name).to_numpy()
        assert union[name] == approx(busy_union_s(epoch_start[mask], epoch_end[mask]), abs=1e-6)


def test_busy_union() -> None:
    import numpy as np

    s = np.array([0.0, 1.0, 5.0, 5.5, 9.0, np.nan])
    e = np.array([2.0, 3.0, 6.0, 5.7, 9.0, 1.0])
    assert busy_union_s(s, e) == approx(3.0 + 1.0 + 0.0)
    assert busy_union_s(np.array([]), np.array([])) == 0.0


def test_large_run_is_fast(tmp_path: Path) -> None:
    import time

    run_dir = synthetic_run(tmp_path / "big", prompts=20_000, nodes=8, workers_per_node=8)
    t0 = time.perf_counter()
    summary = summarize(load_run(run_dir))
    assert time.perf_counter() - t0 < 5.0
    assert summary["counts"]["prompts"] == 20_000
    assert len(summary["nodes"]) == 8 and len(summary["workers"]) == 64
    assert sum(n["prompts"] for n in summary["nodes"]) == 20_000


# --------------------------------------------------------------------------- compare


def scaling_run(tmp_path: Path, name: str, nodes: int, wall: float, slots_per_agent: int = 2) -> pd.DataFrame:
    """Four identical prompts spread over ``nodes`` nodes, finishing in ``wall`` seconds."""
    rows = [row(f"q{i}", node=f"n{i % nodes + 1}", start=0.0, latency=wall / 2) for i in range(4)]
    agents = [{"name": "a", "model": "m", "endpoint": "e", "concurrency": slots_per_agent, "weight": 1}]
    blocks = [{"block": "0", "job_id": "9", "submitted_at": iso(0), "ended_at": iso(wall),
               "nodes": [f"n{k + 1}" for k in range(nodes)], "cores_per_node": 4}]  # fmt: skip
    return load_run(make_run(tmp_path / name, rows, run_meta(name, finish=wall, agents=agents, blocks=blocks)))


def test_compare_one_and_two_nodes(tmp_path: Path) -> None:
    one = scaling_run(tmp_path, "one", nodes=1, wall=8.0)
    two = scaling_run(tmp_path, "two", nodes=2, wall=5.0)
    table = compare([one, two])
    assert table["run_id"].tolist() == ["one", "two"]
    assert table["nodes"].tolist() == [1, 2]
    assert set(table["resource"]) == {"nodes"}
    assert table["wall_s"].tolist() == [8.0, 5.0]
    assert table["ok_per_s"].tolist() == approx([4 / 8, 4 / 5])
    assert table["speedup"].tolist() == approx([1.0, 8 / 5])
    assert table["ideal_speedup"].tolist() == approx([1.0, 2.0])
    assert table["efficiency"].tolist() == approx([1.0, 0.8])


def test_compare_same_nodes_scales_agent_slots(tmp_path: Path) -> None:
    small = scaling_run(tmp_path, "small", nodes=1, wall=8.0, slots_per_agent=2)
    big = scaling_run(tmp_path, "big", nodes=1, wall=2.0, slots_per_agent=8)
    table = compare([small, big])
    assert set(table["resource"]) == {"agent_slots"}
    assert table["resources"].tolist() == [2, 8]
    assert table["speedup"].tolist() == approx([1.0, 4.0])
    assert table["efficiency"].tolist() == approx([1.0, 1.0])


def test_compare_empty_list() -> None:
    assert compare([]).empty


def test_structured_output_rate_per_agent_and_model(tmp_path: Path) -> None:
    """Both readers count valid answers (``parsed`` set) and invalid_output rows per agent and model."""
    import pyarrow.parquet as pq

    rows = []
    for i in range(40):
        r = row(f"q{i:03d}", agent="ab"[i % 2], start=i * 0.1)
        if r["agent"] == "a":  # agent b has no schema: it must not appear
            if i % 10 == 0:
                r.update(status="error", error_type="invalid_output", error="not JSON", response="Sure!")
            else:
                r["parsed"] = json.dumps({"label": "pos"})
        rows.append(r)
    rows.append(row("q900", agent="a", status="error", error_type="timeout"))  # not a structured answer
    run_dir = make_run(tmp_path / "r", rows, run_meta("r"))
    parquet = run_dir / "results.parquet"
    pq.write_table(pq.read_table(parquet), parquet, row_group_size=7)
    compact = summarize_run(run_dir)
    assert compact == json.loads(json.dumps(summarize(load_run(run_dir))))
    assert compact["structured"] == [
        {"agent": "a", "model": "model-a", "answers": 20, "valid": 16, "invalid_output": 4, "invalid_output_rate": 0.2}
    ]


def test_no_structured_section_without_schemas(known: dict[str, Any]) -> None:
    assert known["structured"] is None


def test_server_time_tells_waiting_for_a_slot_from_work(tmp_path: Path) -> None:
    """llama-server's per-response timings split latency into waiting for a slot and the server's work.

    Two agents x 2 slots = 4 slots over a 10 s run; three rows have timings:
      p1 latency 2 = queue 1.5 + prompt 0.1 + generation 0.4
      p2 latency 4 = queue 3.0 + prompt 0.2 + generation 0.8
      p3 latency 1 = queue 0.0 + prompt 0.1 + generation 0.9
    queue 4.5 of their 7 s latency; busy agent-s 12 (every row), so work = 12 - 4.5 = 7.5 of 40.
    """
    timings = {"p1": (1.5, 0.1, 0.4), "p2": (3.0, 0.2, 0.8), "p3": (0.0, 0.1, 0.9)}
    rows = [dict(r) for r in KNOWN_ROWS]
    for r in rows:
        queue, prompt, generation = timings.get(r["custom_id"], (None, None, None))
        r.update(server_queue_s=queue, server_prompt_s=prompt, server_generation_s=generation)
    run_dir = make_run(tmp_path / "timed", rows, run_meta("timed", blocks=KNOWN_BLOCKS))
    summary = summarize(load_run(run_dir))
    server = summary["server_time"]
    assert server["n"] == 3
    assert server["queue_s"] == approx(4.5) and server["prompt_s"] == approx(0.4) and server["generation_s"] == approx(2.1)
    assert server["queue_share"] == approx(4.5 / 7)
    assert server["queue_p50"] == approx(1.5)
    assert summary["parallel_efficiency"] == approx(12 / 40)
    assert server["work_agent_s"] == approx(7.5) and server["work_efficiency"] == approx(7.5 / 40)
    assert summarize_run(run_dir)["server_time"] == server  # the compact reader agrees
    # without timings (every server but llama-server) there is no such section
    assert summarize(load_run(known_run(tmp_path)))["server_time"] is None
