"""_memory: what the end of a run hands back to the system between its passes (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator knobs")

_RSS = "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"


def _run(code: str, *args: str) -> int:
    done = subprocess.run([sys.executable, "-c", _RSS + code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


# glibc raises its mmap threshold to the size of a mapped block once it is freed: the next
# array of that size comes from the heap and stays there after it is freed
_REUSED_ARRAY = """
import sys
import numpy as np
from parsl_chat import _memory
if sys.argv[1] == "mapped":
    _memory.map_large_blocks()
a = np.ones(1_000_000); del a
before = rss()
b = np.ones(1_000_000); del b
print(rss() - before)
"""


def test_large_blocks_go_back_to_the_system_when_freed() -> None:
    assert _run(_REUSED_ARRAY, "default") >= 6  # MB of an 8 MB array kept
    assert _run(_REUSED_ARRAY, "mapped") <= 1


# another thread frees most of what it allocated, leaving holes in its arena
_THREAD_HOLES = """
import threading
import numpy as np
from parsl_chat import _memory
kept = []
def work():
    arrays = [np.ones(12_000) for _ in range(400)]  # ~96 KB each: from the thread's arena, not mapped
    kept.extend(arrays[::10])
worker = threading.Thread(target=work)
worker.start()
worker.join()
before = rss()
_memory.release()
print(before - rss())
"""


def test_release_returns_what_other_threads_freed() -> None:
    assert _run(_THREAD_HOLES) >= 15  # of ~34 MB freed in the thread's arena
