"""cli.py: the program's entry point (the commands are tested through it in the other files)."""

from __future__ import annotations

import subprocess
import sys


def test_main_returns_the_exit_code_with_the_collector_spared_its_final_passes() -> None:
    code = "import gc\nfrom parsl_chat.cli import main\nprint(main(['config', 'nonsense']), gc.get_freeze_count() > 0)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[-2:] == ["2", "True"], (done.stdout, done.stderr)


def test_serve_simulate_takes_the_fault_options() -> None:
    """``serve --simulate --rate-429 1 --retry-after-s 0.5``: every request is refused with that Retry-After."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "parsl_chat", "serve", "--simulate", "--rate-429", "1", "--retry-after-s", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child exits (EOF) if it cannot start
        assert line.startswith("parsl-chat simulated endpoint: "), line + (proc.stderr.read() if proc.stderr else "")
        url = line.split(": ", 1)[1].strip()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "0.5"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_serve_simulate_refuses_rates_over_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "parsl_chat", "serve", "--simulate", "--rate-500", "0.6", "--rate-hang", "0.6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "must not exceed 1" in done.stderr
