"""scripts/install: a portable llama.cpp by default, one cached wheel per kind of build.

The script's logic runs against a stand-in ``python3`` that records the pip calls (a
real build takes minutes); the model test checks the llama-cpp-python really installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parsl_chat import server as srv

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install"
#: what scripts/install's portable build (GGML_NATIVE=OFF) may use; llama.cpp's names
PORTABLE = {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "NEON"}

FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "CMAKE_ARGS=${CMAKE_ARGS-} $*" >> "$PIP_LOG"
prev=""
for arg in "$@"; do
  [[ $prev == --wheel-dir ]] && touch "$arg/llama_cpp_python-$LLAMA_VERSION-py3-none-linux_x86_64.whl"
  prev=$arg
done
exit 0
"""


def pinned_llama_version() -> str:
    match = re.search(r"^\s*llama-cpp-python\[server\]==([0-9.]+)\s*$", (REPO / "setup.cfg").read_text(), re.M)
    assert match, "setup.cfg pins llama-cpp-python[server]"
    return match.group(1)


def test_unknown_option_exits_2_with_usage() -> None:
    result = subprocess.run([str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "usage: scripts/install [--test] [--native]" in result.stderr


def test_the_hints_name_the_pinned_version() -> None:
    assert pinned_llama_version() == srv.LLAMA_CPP_VERSION


class FakeInstall:
    def __init__(self, tmp_path: Path) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python3").write_text(FAKE_PYTHON)
        (bin_dir / "python3").chmod(0o755)
        self.log = tmp_path / "pip.log"
        self.cache = tmp_path / "cache"
        self.env = {k: v for k, v in os.environ.items() if k != "CMAKE_ARGS"}
        self.env.update(
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            PIP_LOG=str(self.log),
            XDG_CACHE_HOME=str(self.cache),
            LLAMA_VERSION=pinned_llama_version(),
        )

    def __call__(self, *args: str, cmake_args: str | None = None) -> tuple[str, list[str]]:
        """Run scripts/install; its output and the pip calls it made."""
        self.log.write_text("")
        env = dict(self.env, **({"CMAKE_ARGS": cmake_args} if cmake_args is not None else {}))
        result = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr, self.log.read_text().splitlines()

    def wheels(self) -> list[str]:
        return sorted(p.parent.name for p in (self.cache / "parsl-chat" / "wheels").glob("*/*.whl"))


def test_one_cached_wheel_per_kind_of_build(tmp_path: Path) -> None:
    install = FakeInstall(tmp_path)
    version, arch = pinned_llama_version(), platform.machine()

    out, calls = install()
    assert f"llama-cpp-python {version}, portable build (CMAKE_ARGS=-DGGML_NATIVE=OFF): compiling into" in out
    assert "about 6 minutes on 2 cores" in out
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_NATIVE=OFF ")
    # pip's wheel cache ignores CMAKE_ARGS: it must neither hand back a wheel nor keep this one
    assert "--no-cache-dir" in build and "--no-binary llama-cpp-python" in build and f"llama-cpp-python=={version}" in build
    installs = [c for c in calls if " install " in c]
    wheel = install.cache / "parsl-chat" / "wheels" / f"llama-cpp-python-{version}-{arch}-portable"
    assert f"--no-deps --force-reinstall {wheel}/llama_cpp_python-{version}-" in installs[0]
    assert installs[1].endswith("-e .")  # parsl-chat after the wheel: pip then finds llama-cpp-python satisfied

    out, calls = install()
    assert not [c for c in calls if " wheel " in c], "the second install compiled again"
    assert f"portable build: using {wheel}/" in out

    out, calls = install("--native", "--test")
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_NATIVE=ON ")
    assert [c for c in calls if " install " in c][1].endswith("-e .[test]")

    out, calls = install("--native", cmake_args="-DGGML_CUDA=on")
    assert "CMAKE_ARGS is set, so --native is ignored" in out
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_CUDA=on ")

    kinds = install.wheels()
    assert len(kinds) == 3 and kinds[2] == f"llama-cpp-python-{version}-{arch}-portable"
    assert re.fullmatch(rf"llama-cpp-python-{version}-{arch}-custom-[0-9a-f]{{10}}", kinds[0])
    assert re.fullmatch(rf"llama-cpp-python-{version}-{arch}-native-[0-9a-f]{{10}}", kinds[1])
    assert not list((install.cache / "parsl-chat" / "wheels").glob("*.partial.*"))


def _installed_kind() -> str:
    """How the installed llama-cpp-python was built, from the wheel scripts/install installed it from."""
    try:
        direct = importlib.metadata.distribution("llama-cpp-python").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return "missing"
    url = json.loads(direct or "{}").get("url", "")
    match = re.search(r"/parsl-chat/wheels/llama-cpp-python-[^/]*-(portable|native|custom)(?:-[0-9a-f]+)?/", url)
    return match.group(1) if match else "unknown (not from scripts/install)"


@pytest.mark.model
def test_installed_llama_cpp_is_portable_unless_built_native() -> None:
    kind = _installed_kind()
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    # a child process: a build for another CPU would kill it with SIGILL, not pytest
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import llama_cpp {srv.describe_exit(result.returncode)}: {result.stderr[-2000:]}"
    features = srv.llama_build_features(result.stdout)
    assert features, f"no system info from llama_cpp: {result.stdout!r}"
    if kind in ("native", "custom"):
        assert not srv.unsupported_features(features), f"a {kind} build for another CPU: {features}"
        return
    beyond = [f for f in features if f in srv._CPU_FLAGS and f not in PORTABLE]
    assert not beyond, (
        f"llama-cpp-python ({kind}) was compiled with {', '.join(beyond)}: it dies with SIGILL on CPUs "
        "without them. Rebuild it portable: scripts/install (or scripts/install --native on purpose)"
    )
    if platform.machine() == "x86_64":
        assert {"AVX", "AVX2", "FMA", "F16C"} <= set(features), f"the portable baseline is missing: {features}"
