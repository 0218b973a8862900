"""parsl_chat.report: terminal tables, the self-contained HTML report (checked in headless Chromium), report_runs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from runfactory import T0, make_run, row, run_meta, synthetic_run

from parsl_chat.analysis import compare, load_run, summarize
from parsl_chat.errors import UsageError
from parsl_chat.report import (
    PLOT_NAMES,
    render_comparison,
    render_terminal,
    report_runs,
    timeline_segments,
    write_comparison_html,
    write_html,
)
from parsl_chat.report.figures import plot_context
from parsl_chat.report.plots import RUN_PLOTS
from parsl_chat.report.timeline import inflight_series

CHROMIUM = os.environ.get("PARSL_CHAT_CHROMIUM", "/usr/bin/chromium")
SECRET = "sk-abcdefghijklmnop"


def console() -> Console:
    return Console(file=io.StringIO(), width=140, record=True, color_system=None)


def text_of(c: Console) -> str:
    return c.export_text()


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_run(tmp_path_factory.mktemp("runs") / "slurm", prompts=300, nodes=4, cost={"su_per_node_hour": 2.0})


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_run(tmp_path_factory.mktemp("runs") / "small", prompts=40, nodes=2, workers_per_node=2)


def all_failed_run(tmp_path: Path) -> Path:
    rows = [row(f"p{i}", start=i * 0.5, latency=0.4, status="error", error_type="auth") for i in range(6)]
    return make_run(tmp_path / "failed", rows, run_meta("all-failed", status="failed"))


def partial_run(tmp_path: Path) -> Path:
    rows = [row(f"p{i}", worker=f"w{i % 2}", start=i, latency=1.5) for i in range(5)]
    run = run_meta("partial", finish=None, status="interrupted")
    return make_run(tmp_path / "partial", [], run, results=False, ledger=True, ledger_rows=rows, torn=True)


def empty_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "empty", [], run_meta("empty", finish=None, status="running"), results=False)


# --------------------------------------------------------------------------- terminal


def test_terminal_report_full(slurm_run: Path) -> None:
    c = console()
    render_terminal(summarize(load_run(slurm_run)), c)
    out = text_of(c)
    for needle in (
        "Overview", "parallel efficiency", "prompts/s", "tokens/s", "wall time", "Failures by type", "Latency and queue wait",
        "p50", "p95", "p99", "queue wait", "Agents", "utilisation", "Nodes", "Workers", "Allocation", "idle", "Blocks",
        "Cost", "SU", "Slowest prompts",
    ):  # fmt: skip
        assert needle in out, needle
    assert "synthetic-4n" in out


def test_reports_tell_waiting_for_a_server_slot_from_work(tmp_path: Path) -> None:
    # 4 rows of 2 s at a llama-server, 1.5 s of each waiting for a slot: 75% of latency queued
    rows = [dict(row(f"p{i}", start=i, latency=2.0), server_queue_s=1.5, server_prompt_s=0.1, server_generation_s=0.4)
            for i in range(4)]  # fmt: skip
    run_dir = make_run(tmp_path / "timed", rows, run_meta("timed"))
    df = load_run(run_dir)
    summary = summarize(df)
    c = console()
    render_terminal(summary, c)
    out = text_of(c)
    assert "server slot wait" in out and "75.0%" in out and "efficiency without it" in out
    html = write_html(df, summary, tmp_path / "report.html").read_text()
    assert "server slot wait" in html and "75.0%" in html
    # a run without server timings shows neither
    plain = make_run(tmp_path / "plain", [row("p1")], run_meta("plain"))
    c = console()
    render_terminal(summarize(load_run(plain)), c)
    assert "server slot wait" not in text_of(c)


def test_terminal_report_all_failed(tmp_path: Path) -> None:
    c = console()
    render_terminal(summarize(load_run(all_failed_run(tmp_path))), c)
    out = text_of(c)
    assert "No successful prompts: latency not available" in out
    assert "auth" in out and "failed" in out


def test_terminal_report_partial_and_empty(tmp_path: Path) -> None:
    c = console()
    render_terminal(summarize(load_run(partial_run(tmp_path))), c)
    out = text_of(c)
    assert "interrupted" in out and "ledger.jsonl" in out and "5 prompt(s) recorded so far" in out
    c = console()
    render_terminal(summarize(load_run(empty_run(tmp_path))), c)
    out = text_of(c)
    assert "No prompts recorded" in out
    assert "Overview" in out


def test_render_comparison(tmp_path: Path) -> None:
    one = load_run(synthetic_run(tmp_path / "a", prompts=60, nodes=1, run_id="one-node"))
    two = load_run(synthetic_run(tmp_path / "b", prompts=60, nodes=2, run_id="two-nodes"))
    c = console()
    render_comparison(compare([one, two]), c)
    out = text_of(c)
    assert "Scaling comparison" in out and "one-node" in out and "two-nodes" in out
    assert "baseline: one-node" in out and "ideal = nodes" in out
    assert "2.00x" in out  # ideal speedup of the 2-node run


# --------------------------------------------------------------------------- plots


def test_every_plot_has_title_and_labelled_axes(slurm_run: Path) -> None:
    df = load_run(slurm_run)
    ctx = plot_context(df, summarize(df))
    for name, plot in RUN_PLOTS.items():
        fig = plot(ctx)
        for ax in fig.axes:
            if not ax.get_visible() or not (ax.lines or ax.patches or ax.collections):
                continue
            assert ax.get_title(loc="left") or ax.get_title(), f"{name}: untitled axes"
            shared_x = ax.get_shared_x_axes().get_siblings(ax)
            assert any(other.get_xlabel() for other in shared_x), f"{name}: no x label"
            if name not in ("agents", "nodes") or ax is fig.axes[0]:
                assert ax.get_ylabel() or ax.get_yticklabels(), f"{name}: no y label"
        labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)
        if name in ("timeline", "inflight", "throughput", "latency_hist", "latency_cdf", "allocation"):
            assert re.search(r"\((s|min|h)\b|\(s\)|latency \(s\)", labels), f"{name}: no unit in {labels!r}"


def test_timeline_thins_large_runs(tmp_path: Path) -> None:
    df = load_run(synthetic_run(tmp_path / "big", prompts=6000, nodes=8, workers_per_node=8))
    segments, lanes, total = timeline_segments(df, pd.Timestamp(T0), max_lanes=20, max_bars=500)
    assert total == 64 and len(lanes) == 20
    assert len(segments) <= 500
    lane_of = df["node"] + " / " + df["worker"]
    assert int(segments["count"].sum()) == int(lane_of.isin(lanes).sum())
    small, _, _ = timeline_segments(df.head(50), pd.Timestamp(T0))
    assert len(small) == 50 and set(small["count"]) == {1}


def test_inflight_series() -> None:
    times, counts = inflight_series(np.array([0.0, 1.0, 3.0]), np.array([2.0, 3.0, 4.0]))
    assert counts.max() == 2
    assert counts[-1] == 0
    # at t=3 one request ends and one starts: never counted as 2 or 0 in between
    at3 = counts[times == 3.0]
    assert set(at3.tolist()) <= {0.0, 1.0}
    grid_t, grid_c = inflight_series(np.arange(5000.0), np.arange(5000.0) + 2.5, max_points=1000)
    assert grid_t.size == 1000 and grid_c.max() <= 3


# --------------------------------------------------------------------------- HTML


def plots_in(html_text: str) -> list[str]:
    return re.findall(r'<img data-plot="([a-z_]+)"', html_text)


def assert_self_contained(html_text: str) -> None:
    assert "<link" not in html_text
    assert not re.search(r'(src|href)="(https?:)?//', html_text)
    assert "@import" not in html_text and "url(" not in html_text
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]+)"', html_text))


def test_write_html_contents(slurm_run: Path, tmp_path: Path) -> None:
    df = load_run(slurm_run)
    path = write_html(df, summarize(df), tmp_path / "out" / "report.html")
    text = path.read_text()
    assert plots_in(text) == list(PLOT_NAMES)
    assert_self_contained(text)
    for needle in ("parallel efficiency", "Timeline", "Slowest prompts", "run.json", "config.yaml", "node-seconds", "Cost"):
        assert needle in text
    assert SECRET not in text  # config.yaml's api_key is masked
    assert "partition: gpu" in text


@pytest.mark.parametrize("make", [all_failed_run, partial_run, empty_run])
def test_write_html_degenerate_runs(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    df = load_run(make(tmp_path))
    summary = summarize(df)
    text = write_html(df, summary, tmp_path / "r.html").read_text()
    assert plots_in(text) == [p for p in PLOT_NAMES if p != "allocation"]
    assert_self_contained(text)
    if make is all_failed_run:
        assert "No successful prompts: latency not available" in text
    if make is empty_run:
        assert "No prompts recorded" in text
    if make is partial_run:
        assert "interrupted" in text


def test_html_masks_secrets_but_keeps_token_counts(tmp_path: Path) -> None:
    config = "agents:\n  - name: a\n    api_key: sk-live-0123456789abcdef\n    max_tokens: 512\nhf_token: hf_secret_value\n"
    cost = {"usd_per_1m_prompt_tokens": 0.5, "usd_per_1m_completion_tokens": 1.5}
    run_dir = make_run(tmp_path / "r", [row("p1")], run_meta("r", cost=cost), config_yaml=config)
    df = load_run(run_dir)
    text = write_html(df, summarize(df), tmp_path / "r.html").read_text()
    assert "sk-live-0123456789abcdef" not in text and "hf_secret_value" not in text
    assert "max_tokens: 512" in text
    assert "usd_per_1m_prompt_tokens&quot;: 0.5" in text


def test_report_without_run_json(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "bare", [row("p1", start=0, latency=2), row("p2", start=1, latency=2)], None)
    df = load_run(run_dir)
    summary = summarize(df)
    assert summary["wall_s"] == pytest.approx(3.0)
    assert any("run.json is missing" in note for note in summary["run"]["notes"])
    c = console()
    render_terminal(summary, c)
    assert "run.json is missing" in text_of(c)
    text = write_html(df, summary, tmp_path / "bare.html").read_text()
    assert "run.json is missing" in text


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"Chromium not found at {CHROMIUM}: install Debian's chromium package to render the HTML report")
    exe = CHROMIUM if os.path.exists(CHROMIUM) else str(shutil.which("chromium"))
    base = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]  # fmt: skip
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=90, check=False)


def loaded_counts(dom: str) -> tuple[int, int]:
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    loaded = re.search(r'data-plots-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-plots-total="(\d+)"', body.group(0))
    assert loaded and total, body.group(0)
    return int(loaded.group(1)), int(total.group(1))


def test_html_renders_in_chromium(slurm_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    df = load_run(slurm_run)
    path = write_html(df, summarize(df), tmp_path / "report.html")
    dom = chromium(tmp_path, "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded, total = loaded_counts(dom.stdout)
    assert total == len(PLOT_NAMES)
    assert loaded == total, f"only {loaded} of {total} plots decoded"
    for name in PLOT_NAMES:
        assert f'data-plot="{name}"' in dom.stdout
    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", path.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 4000)
    pixels = np.asarray(image)
    assert pixels.std() > 20  # not a blank page
    if os.environ.get("PARSL_CHAT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["PARSL_CHAT_KEEP_SCREENSHOT"])


def test_comparison_html_renders_in_chromium(tmp_path: Path) -> None:
    dfs = [load_run(synthetic_run(tmp_path / f"r{n}", prompts=40, nodes=n, run_id=f"{n}-nodes")) for n in (1, 2, 4)]
    table = compare(dfs)
    path = write_comparison_html(table, dfs, tmp_path / "compare.html")
    text = path.read_text()
    assert plots_in(text) == ["speedup", "efficiency", "throughput", "latency_cdf"]
    assert_self_contained(text)
    assert "4-nodes" in text and "scaling eff." in text
    dom = chromium(tmp_path, "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert loaded_counts(dom.stdout) == (4, 4)


# --------------------------------------------------------------------------- report_runs


def test_report_runs_single(small_run: Path, tmp_path: Path) -> None:
    c = console()
    assert report_runs([small_run], None, False, c) == 0
    out = text_of(c)
    target = small_run / "report.html"
    assert target.exists()
    assert "HTML report:" in out and str(target) in out.replace("\n", "")
    custom = tmp_path / "elsewhere" / "r.html"
    assert report_runs([small_run], custom, False, console()) == 0
    assert custom.exists()


def test_report_runs_json(small_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    c = Console(file=buf, width=80)
    assert report_runs([small_run], None, True, c) == 0
    payload = json.loads(buf.getvalue())
    assert payload == json.loads(json.dumps(summarize(load_run(small_run))))
    assert "HTML report:" in capsys.readouterr().err


def test_report_runs_several(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = synthetic_run(tmp_path / "a", prompts=24, nodes=1, workers_per_node=2, run_id="a")
    b = synthetic_run(tmp_path / "b", prompts=24, nodes=2, workers_per_node=2, run_id="b")
    monkeypatch.chdir(tmp_path)
    c = console()
    assert report_runs([a, b], None, False, c) == 0
    assert (tmp_path / "report-compare.html").exists()
    assert "Scaling comparison" in text_of(c)
    buf = io.StringIO()
    assert report_runs([a, b], tmp_path / "cmp.html", True, Console(file=buf, width=80)) == 0
    payload = json.loads(buf.getvalue())
    assert [r["run_id"] for r in payload["comparison"]] == ["a", "b"]
    assert payload["comparison"][1]["ideal_speedup"] == pytest.approx(2.0)
    assert len(payload["runs"]) == 2


def test_report_runs_rejects_non_run_dirs(tmp_path: Path) -> None:
    (tmp_path / "notarun").mkdir()
    with pytest.raises(UsageError, match="notarun"):
        report_runs([tmp_path / "notarun"], None, False, console())
    with pytest.raises(UsageError):
        report_runs([], None, False, console())
