"""cli.py: the program's entry point (the commands are tested through it in the other files)."""

from __future__ import annotations

import subprocess
import sys


def test_main_returns_the_exit_code_with_the_collector_spared_its_final_passes() -> None:
    code = "import gc\nfrom parsl_chat.cli import main\nprint(main(['config', 'nonsense']), gc.get_freeze_count() > 0)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[-2:] == ["2", "True"], (done.stdout, done.stderr)
