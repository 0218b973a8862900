"""The CI guard in conftest.py: under CI=true a skip, at run time or at collection, is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SKIPPING = {
    "test_skips_when_run.py": "import pytest\n\ndef test_needs_it():\n    pytest.skip('no cluster here')\n",
    # a whole file skipped while it is collected, as the Kubernetes tests do without kmock
    "test_skips_when_collected.py": "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n",
}


def _pytest(folder: Path, ci: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    plugins = ["-p", "conftest", "-p", "no:kmock", "-p", "no:cacheprovider"]  # the project's guard, as its addopts
    command = [sys.executable, "-m", "pytest", "-q", *plugins, "--rootdir", str(folder), str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=folder)
    return done.stdout.strip().splitlines()[-1]


def test_skips_fail_under_ci_whether_at_run_time_or_at_collection(tmp_path: Path) -> None:
    for name, text in SKIPPING.items():
        folder = tmp_path / name.removesuffix(".py")
        folder.mkdir()
        (folder / name).write_text(text)
        assert _pytest(folder, ci=False).startswith("1 skipped"), name
        ended = _pytest(folder, ci=True)
        assert "skipped" not in ended and ("1 failed" in ended or "1 error" in ended), (name, ended)
