"""Nothing lost: kill -9, signals, resume exactly once, changed inputs, bad input everywhere."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from conftest import REPO, clean_env, run_cli, start_cli, wait_rows, write_prompts

from parsl_chat.io.ledger import read_ledger


def _start(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # Parsl-specific faults need Parsl's processes from the start, not the warm-start driver
    return start_cli(args, extra_env or {"PARSL_CHAT_WARM_START": "0"})


def _recorded(out: Path) -> list[str]:
    return [row["custom_id"] for row in read_ledger(out / "ledger.jsonl")]


@pytest.mark.parametrize("backend", ["no-parsl", "parsl"])
def test_kill_9_at_random_points_then_resume_exactly_once(backend: str, sim_server, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    server = sim_server(latency_ms=40, jitter_ms=40, log_path=str(log))
    n = 300
    prompts = write_prompts(tmp_path / "p.jsonl", n)
    out = tmp_path / "run"
    extra = ["--no-parsl"] if backend == "no-parsl" else []
    rng = random.Random(7)
    recorded_at_kill: set[str] = set()
    first = True
    for round_ in range(3):
        args = ["run", str(prompts), "--endpoint", server.url, "--out", str(out)] if first else ["run", "--resume", str(out)]
        first = False
        driver = _start([*args, *extra])
        already = len(_recorded(out)) if (out / "ledger.jsonl").exists() else 0
        wait_rows(out, already + rng.randint(10, 60))
        time.sleep(rng.uniform(0, 0.3))
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        orphans = [p["pid"] for p in json.loads((out / "run.json").read_text()).get("processes", [])]
        if backend == "parsl":
            assert orphans and any(psutil.pid_exists(pid) for pid in orphans)  # the interchange outlived its driver
        kill_time = time.time()
        recorded_at_kill = set(_recorded(out))
        assert len(recorded_at_kill) < n, f"round {round_}: the run finished before the kill"
        # what the server answers from now on must not include anything already recorded
        resent = [r for r in server.requests() if r["t"] > kill_time + 1.0 and r["prompt"] in _texts(recorded_at_kill)]
        assert resent == []
    final = run_cli("run", "--resume", str(out), *extra, env={"PARSL_CHAT_WARM_START": "0"})
    assert final.returncode == 0, final.stderr
    assert not [pid for pid in orphans if _alive(pid)], "the resume left the killed driver's Parsl processes running"
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == n and df.custom_id.is_unique and (df.status == "ok").all()
    assert sorted(df.custom_id) == sorted(f"p{i}" for i in range(n))
    ledger_texts = _texts(recorded_at_kill)
    after_last_kill = [r for r in server.requests() if r["t"] > kill_time + 1.0]
    assert not [r for r in after_last_kill if r["prompt"] in ledger_texts], "a recorded prompt was sent again"


def _texts(ids: set[str]) -> set[str]:
    return {f"question {cid[1:]}" for cid in ids}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_sigterm_stops_cleanly_with_exit_3_and_resumes(sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=100)
    prompts = write_prompts(tmp_path / "p.jsonl", 400)
    out = tmp_path / "run"
    driver = _start(["run", str(prompts), "--endpoint", server.url, "--out", str(out), "--no-parsl"])
    wait_rows(out, 20)
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 3, stderr
    assert f"parsl-chat run --resume {out}" in stderr
    assert "Traceback" not in stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted"
    partial = pd.read_parquet(out / "results.parquet")
    assert 20 <= len(partial) < 400 and partial.custom_id.is_unique
    sent_before = len(server.requests())
    assert sent_before == len(partial)  # in-flight requests were finished and recorded, not dropped
    resumed = run_cli("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 400 and df.custom_id.is_unique
    assert len(server.requests()) == 400  # nothing answered twice
    # the resume, not told --no-parsl again, ran as the run did: in this process, no Parsl started
    assert json.loads((out / "run.json").read_text())["executor"] == "in-process"
    assert not (out / "logs" / "parsl").exists()


def test_second_ctrl_c_stops_at_once_and_ledger_stays_valid(sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=3000)
    prompts = write_prompts(tmp_path / "p.jsonl", 50)
    out = tmp_path / "run"
    driver = _start(["run", str(prompts), "--endpoint", server.url, "--out", str(out), "--no-parsl"])
    time.sleep(2.5)
    driver.send_signal(signal.SIGINT)
    time.sleep(0.3)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=30)
    assert driver.returncode == 3, stderr
    assert "Traceback" not in stderr
    rows = list(read_ledger(out / "ledger.jsonl"))
    assert all(r["custom_id"].startswith("p") for r in rows)
    assert (out / "ledger.jsonl").read_bytes().endswith(b"\n") or not rows


def test_worker_killed_mid_run_loses_nothing(sim_server, tmp_path: Path) -> None:
    server = sim_server(latency_ms=50)
    prompts = write_prompts(tmp_path / "p.jsonl", 400)
    out = tmp_path / "run"
    driver = _start(["run", str(prompts), "--endpoint", server.url, "--out", str(out), "--workers", "2"])
    wait_rows(out, 30, timeout=120)
    pools = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(out) in " ".join(p.info["cmdline"] or []) and "process_worker_pool" in " ".join(p.info["cmdline"] or [])
    ]
    assert pools, "no Parsl worker pool found"
    workers = pools[0].children()
    assert workers, "the worker pool has no worker processes"
    workers[0].kill()  # one worker process dies mid-chunk
    _, stderr = driver.communicate(timeout=240)
    assert driver.returncode == 0, stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 400 and df.custom_id.is_unique and (df.status == "ok").all()


def test_changed_prompts_refused_unless_force_and_retry_failed(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "a", "prompt": "first"}\n{"id": "b", "prompt": "__bad_request__"}\n{"id": "c", "prompt": "third"}\n'
    )
    out = tmp_path / "run"
    first = run_cli("run", str(prompts), "--endpoint", server.url, "--out", str(out), "--no-parsl")
    assert first.returncode == 1
    prompts.write_text('{"id": "a", "prompt": "CHANGED"}\n{"id": "b", "prompt": "now fine"}\n{"id": "c", "prompt": "third"}\n')
    refused = run_cli("run", "--resume", str(out), "--retry-failed")
    assert refused.returncode == 2
    assert f"{prompts}:1: prompt 'a' differs from the one already answered" in refused.stderr
    assert len(server.requests()) == 3
    forced = run_cli("run", "--resume", str(out), "--retry-failed", "--force")
    assert forced.returncode == 0, forced.stderr
    df = pd.read_parquet(out / "results.parquet").set_index("custom_id")
    assert len(df) == 3 and (df.status == "ok").all()
    # the failed prompt and the changed one were sent again, the unchanged 'c' was not
    assert sorted(r["prompt"] for r in server.requests()[3:]) == ["CHANGED", "now fine"]
    assert df.loc["a", "response"].startswith("sim CHANGED")
    nothing_left = run_cli("run", "--resume", str(out))
    assert nothing_left.returncode == 0, nothing_left.stderr
    assert len(server.requests()) == 5


BAD_INPUTS = {
    "invalid-json": (b'{"prompt": "ok"}\n{"prompt": \n', ":2: invalid JSON"),
    "empty-file": (b"", ":1: file has no prompts"),
    "duplicate-ids": (b'{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', ":2: duplicate id 'x' (first on line 1)"),
    "invalid-utf8": (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', ":2: not valid UTF-8"),
    # the cap set to 1 MiB through the environment (the default, 64 MiB, is checked in test_prompts)
    "huge-line": (
        b'{"prompt": "' + b"x" * (2 << 20) + b'"}\n',
        ":1: line is longer than 1 MiB, the limit for one prompt (limits.max_line_mb)",
    ),
    "wrong-type": (b'{"prompt": 42}\n', ":1: field 'prompt': expected a string"),
    "unknown-field": (b'{"prompt": "a", "temprature": 1}\n', ":1: unknown field 'temprature'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_prompts_files(case: str, tmp_path: Path) -> None:
    content, expected = BAD_INPUTS[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    for command in (
        ["validate", str(path)],
        ["run", str(path), "--endpoint", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "r")],
    ):
        result = run_cli(*command, env={"PARSL_CHAT_LIMITS_MAX_LINE_MB": "1"})
        assert result.returncode == 2, (command, result.stderr)
        assert f"{path}{expected}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "ledger.jsonl").exists()


BAD_CONFIGS = {
    "unknown-key": ("limits:\n  concurrncy: 3\n", ":2: unknown key 'concurrncy' in 'limits'; valid keys: concurrency"),
    "wrong-type": ("limits:\n  timeout_s: soon\n", ":2: 'limits.timeout_s' must be a number"),
    "bad-yaml": ("agents: [\n", "invalid YAML"),
    "not-a-mapping": ("- a\n- b\n", ":1: expected a mapping"),
    "agent-unknown-key": ("agents:\n  - name: a\n    temprature: 1\n", ":3: unknown key 'temprature' in 'agents'"),
    "bad-routing": ("routing: fastest\n", "unknown routing 'fastest'; valid: round_robin, least_loaded"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_configs(case: str, tmp_path: Path) -> None:
    text, expected = BAD_CONFIGS[case]
    config = tmp_path / "agents.yaml"
    config.write_text(text)
    result = run_cli("run", str(REPO / "examples" / "prompts.jsonl"), "--config", str(config), "--endpoint", "http://x/v1")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_missing_and_unreadable_config_and_profile(tmp_path: Path) -> None:
    prompts = str(REPO / "examples" / "prompts.jsonl")
    missing = run_cli("run", prompts, "--config", str(tmp_path / "nope.yaml"), "--endpoint", "http://x/v1")
    assert missing.returncode == 2 and f"{tmp_path / 'nope.yaml'}: no such file" in missing.stderr
    folder = run_cli("run", prompts, "--config", str(tmp_path), "--endpoint", "http://x/v1")
    assert folder.returncode == 2 and "Traceback" not in folder.stderr
    bad_profile = tmp_path / "p.yaml"
    bad_profile.write_text("executor: local\nnamespace: x\n")
    wrong = run_cli("run", prompts, "--profile", str(bad_profile), "--endpoint", "http://x/v1")
    assert wrong.returncode == 2 and "'namespace' applies only to executor kubernetes" in wrong.stderr
    env_bad = run_cli("run", prompts, "--endpoint", "http://x/v1", env={"PARSL_CHAT_WORKRS": "3"})
    assert env_bad.returncode == 2 and "PARSL_CHAT_WORKRS is not a parsl-chat setting" in env_bad.stderr


def test_unwritable_output_is_refused_before_sending(sim_server, tmp_path: Path) -> None:
    server = sim_server()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("run", str(REPO / "examples" / "prompts.jsonl"), "--endpoint", server.url, "--out", str(blocker / "run"))
    assert result.returncode == 2
    assert "cannot write the run directory" in result.stderr and "Traceback" not in result.stderr
    assert server.requests() == []


def test_full_disk_stops_cleanly_with_the_ledger_intact(sim_server, tmp_path: Path) -> None:
    # a file size limit makes writes fail as on a full disk (Python ignores SIGXFSZ, so write() gets EFBIG)
    server = sim_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i} " + "x" * 200}) + "\n" for i in range(3000)))
    out = tmp_path / "run"
    env = clean_env()
    limited = subprocess.run(
        ["bash", "-c", f'ulimit -f 512 && exec "{sys.executable}" -m parsl_chat run {prompts} --endpoint {server.url} '
         f"--out {out} --no-parsl --quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert limited.returncode == 3, limited.stderr
    assert "Traceback" not in limited.stderr and "File too large" in limited.stderr
    assert f"parsl-chat run --resume {out}" in limited.stderr
    recorded = _recorded(out)
    assert 0 < len(recorded) < 3000 and len(recorded) == len(set(recorded))
    resumed = run_cli("run", "--resume", str(out), "--no-parsl", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 3000 and df.custom_id.is_unique


def _interchange_of(driver: subprocess.Popen[Any], timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(driver.pid).children():
            try:
                if any("interchange" in part for part in child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no interchange process under the driver after {timeout} s")


@pytest.mark.parametrize("warm_start", ["1", "0"])
def test_ctrl_c_at_a_terminal_reaches_the_whole_group_and_the_run_still_stops_cleanly(
    warm_start: str, sim_server, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C signals every process of the foreground group, not the driver alone.

    The interchange must survive it (the driver ends it): one killed by that signal left Parsl
    waiting for it forever. With the warm start Parsl is started from a thread, where the
    driver cannot change signal dispositions, so the interchange runs in its own session.
    """
    server = sim_server(latency_ms=100)
    prompts = write_prompts(tmp_path / "p.jsonl", 600)
    out = tmp_path / "run"
    driver = _start(["run", str(prompts), "--endpoint", server.url, "--out", str(out)], {"PARSL_CHAT_WARM_START": warm_start})
    interchange = _interchange_of(driver)
    time.sleep(0.2)  # past the fork: the signal finds the interchange's own disposition
    os.killpg(driver.pid, signal.SIGINT)
    try:
        _, stderr = driver.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        interchange.kill()
        raise AssertionError("the driver hung after a Ctrl-C to its process group") from None
    assert driver.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert not _alive(interchange.pid)  # the driver stopped it on its way out
    resumed = run_cli("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 600 and df.custom_id.is_unique


def _start_on_a_terminal(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """The driver as a login shell's job: a session of its own whose controlling terminal is a pty."""
    import fcntl
    import termios

    master, slave = os.openpty()
    env = clean_env()
    driver = subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", *args],
        cwd=REPO,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # after setsid: the pty becomes its terminal
    )
    os.close(slave)
    return driver, master


def test_terminal_hang_up_stops_the_run_cleanly_and_it_resumes(sim_server, tmp_path: Path) -> None:
    """An SSH session that drops hangs up the terminal: SIGHUP to the driver's session.

    It used to kill the driver at once: run.json stayed 'running' and the interchange
    (in a session of its own) was left behind. Now it is a stop like SIGTERM, whose
    messages go nowhere instead of failing on the dead terminal.
    """
    import select
    import threading

    server = sim_server(latency_ms=100)
    prompts = write_prompts(tmp_path / "p.jsonl", 600)
    out = tmp_path / "run"
    driver, master = _start_on_a_terminal(["run", str(prompts), "--endpoint", server.url, "--out", str(out)])
    reading = threading.Event()
    reading.set()

    def drain() -> None:  # the progress display must not fill the terminal's buffer and block the driver
        while reading.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        interchange = _interchange_of(driver)
        wait_rows(out, 12)
    finally:
        reading.clear()
        reader.join()
        os.close(master)  # the terminal is gone: the kernel sends SIGHUP to the driver's session
    try:
        driver.wait(timeout=90)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise AssertionError("the driver hung after its terminal hung up") from None
    assert driver.returncode == 3
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert "stopping (SIGHUP)" in (out / "logs" / "parsl-chat.log").read_text()
    assert not _alive(interchange.pid)
    resumed = run_cli("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 600 and df.custom_id.is_unique


@pytest.mark.parametrize(
    ("given", "previous", "expected"),
    [
        (None, {}, False),  # a new run: Parsl
        (True, {}, True),
        (None, {"options": {"no_parsl": True}}, True),  # a resume keeps the run's choice
        (False, {"options": {"no_parsl": True}}, False),  # unless told --parsl
        (None, {"options": {"no_parsl": False}}, False),
        (None, {"executor": "in-process", "options": {}}, False),  # a run.json from before the choice was saved: Parsl
    ],
)
def test_a_resume_runs_where_the_run_ran_unless_told(given: bool | None, previous: dict, expected: bool) -> None:
    from parsl_chat.run.options import RunOptions
    from parsl_chat.run.prepare import runs_in_process

    assert runs_in_process(RunOptions(prompts=None, no_parsl=given), previous) is expected
