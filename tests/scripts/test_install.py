"""scripts/install: a portable llama.cpp by default, one cached wheel per kind of build.

The script's logic runs against a stand-in ``python3`` that records the pip calls (a
real build takes minutes); the model test checks the llama-cpp-python really installed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PORTABLE, installed_kind

from parsl_chat.serve import crash, embedded
from parsl_chat.serve import server as srv

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install"
#: what scripts/install's portable build (GGML_NATIVE=OFF) may use; llama.cpp's names
#: stands in for python3: records pip's calls and makes what they would (the sdist, the wheel,
#: pip's build folder); answers scripts/install's two probes; runs its record-writing script
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ ${1-} == -c ]]; then
  case $2 in
    *sys.prefix*) echo "$FAKE_PREFIX"; exit 0 ;;
    *llama_print_system_info*) echo "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 |"; exit 0 ;;
  esac
fi
[[ ${1-} == - ]] && exec "$REAL_PYTHON" "$@"
printf '%s\\n' "CMAKE_ARGS=${CMAKE_ARGS-} $*" >> "$PIP_LOG"
prev=""
for arg in "$@"; do
  [[ $prev == --wheel-dir ]] && mkdir -p "$arg" && touch "$arg/llama_cpp_python-$LLAMA_VERSION-py3-none-linux_x86_64.whl"
  [[ $prev == --dest ]] && mkdir -p "$arg/llama_cpp_python-$LLAMA_VERSION" &&
    tar -czf "$arg/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$arg" "llama_cpp_python-$LLAMA_VERSION"
  [[ $arg == build-dir=* ]] && mkdir -p "${arg#build-dir=}"
  prev=$arg
done
exit 0
"""
#: stands in for cmake: records its calls; a --build makes the two programs and libllama
#: (or fails, with FAKE_CMAKE_FAIL set, as a compiler without C++17 would)
FAKE_CMAKE = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CMAKE_LOG"
[[ ${1-} == --build ]] || exit 0
[[ -n ${FAKE_CMAKE_FAIL-} ]] && { echo "error: no C++17 compiler"; exit 1; }
mkdir -p "$2/bin" "$2/CMakeFiles"
for prog in llama-server llama-batched-bench; do
  printf '#!/usr/bin/env bash\\necho "version: 1 (fake)"\\n' > "$2/bin/$prog"
  chmod +x "$2/bin/$prog"
done
touch "$2/bin/libllama.so"
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
    assert pinned_llama_version() == embedded.LLAMA_CPP_VERSION


class FakeInstall:
    def __init__(self, tmp_path: Path) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in (("python3", FAKE_PYTHON), ("cmake", FAKE_CMAKE), ("ninja", "#!/bin/sh\n")):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.log = tmp_path / "pip.log"
        self.cmake_log = tmp_path / "cmake.log"
        self.cache = tmp_path / "cache"
        self.prefix = tmp_path / "venv"
        self.record = self.prefix / "share" / "parsl-chat" / "llama-server.json"
        self.env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "FAKE_CMAKE_FAIL")}
        self.env.update(
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            PIP_LOG=str(self.log),
            CMAKE_LOG=str(self.cmake_log),
            XDG_CACHE_HOME=str(self.cache),
            FAKE_PREFIX=str(self.prefix),
            REAL_PYTHON=sys.executable,
            LLAMA_VERSION=pinned_llama_version(),
        )

    def __call__(self, *args: str, cmake_args: str | None = None, cmake_fails: bool = False) -> tuple[str, list[str]]:
        """Run scripts/install; its output and the pip calls it made."""
        self.log.write_text("")
        self.cmake_log.write_text("")
        env = dict(self.env, **({"CMAKE_ARGS": cmake_args} if cmake_args is not None else {}))
        if cmake_fails:
            env["FAKE_CMAKE_FAIL"] = "1"
        result = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr, self.log.read_text().splitlines()

    def cmake_calls(self) -> list[str]:
        return self.cmake_log.read_text().splitlines()

    def wheels(self) -> list[str]:
        return sorted(p.parent.name for p in (self.cache / "parsl-chat" / "wheels").glob("*/*.whl"))

    def servers(self) -> list[str]:
        return sorted(p.parents[2].name for p in (self.cache / "parsl-chat" / "llama-server").glob("*/build/bin/llama-server"))


def test_one_cached_wheel_per_kind_of_build(tmp_path: Path) -> None:
    install = FakeInstall(tmp_path)
    version, arch = pinned_llama_version(), platform.machine()
    wheel = install.cache / "parsl-chat" / "wheels" / f"llama-cpp-python-{version}-{arch}-portable"
    server_dir = install.cache / "parsl-chat" / "llama-server" / f"llama.cpp-{version}-{arch}-portable"

    out, calls = install()
    assert f"llama.cpp from llama-cpp-python {version}, portable build (CMAKE_ARGS=-DGGML_NATIVE=OFF): compiling" in out
    assert "about 8 minutes on 2 cores" in out  # said before the compile starts
    [download] = [c for c in calls if " download " in c]
    assert "--no-binary :all:" in download and f"llama-cpp-python=={version}" in download
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_NATIVE=OFF ")
    # pip's wheel cache ignores CMAKE_ARGS: it must neither hand back a wheel nor keep this one
    assert "--no-cache-dir" in build and f"llama_cpp_python-{version}" in build
    # the wheel's cmake build is llama-server's: llama.cpp is compiled once
    assert f"-C build-dir={server_dir}/build" in build
    configure, compile_ = install.cmake_calls()
    assert configure.startswith("-S ") and f"-B {server_dir}/build -DLLAVA_BUILD=OFF" in configure
    assert compile_ == f"--build {server_dir}/build --target llama-server llama-batched-bench"
    installs = [c for c in calls if " install " in c]
    assert f"--no-deps --force-reinstall {wheel}/llama_cpp_python-{version}-" in installs[0]
    assert installs[1].endswith("-e .")  # parsl-chat after the wheel: pip then finds llama-cpp-python satisfied
    record = json.loads(install.record.read_text())
    assert record["server"] == f"{server_dir}/build/bin/llama-server" and record["kind"] == "portable"
    assert record["batched_bench"] == f"{server_dir}/build/bin/llama-batched-bench"
    assert "AVX2 = 1" in record["system_info"]
    assert sorted(p.name for p in (server_dir / "build").iterdir()) == ["bin"]  # only the programs are kept

    out, calls = install()
    assert not [c for c in calls if " wheel " in c or " download " in c], "the second install compiled again"
    assert not install.cmake_calls()
    assert f"portable build: using {wheel}/" in out and f"portable build: using {server_dir}/build/bin/llama-server" in out

    out, calls = install("--native", "--test")
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_NATIVE=ON ")
    assert [c for c in calls if " install " in c][1].endswith("-e .[test]")
    assert json.loads(install.record.read_text())["kind"].startswith("native-")  # the environment follows the install

    out, calls = install("--native", cmake_args="-DGGML_CUDA=on")
    assert "CMAKE_ARGS is set, so --native is ignored" in out
    [build] = [c for c in calls if " wheel " in c]
    assert build.startswith("CMAKE_ARGS=-DGGML_CUDA=on ")

    built = ((install.wheels(), f"llama-cpp-python-{version}-{arch}"), (install.servers(), f"llama.cpp-{version}-{arch}"))
    for kinds, prefix in built:
        assert len(kinds) == 3 and kinds[2] == f"{prefix}-portable", kinds
        assert re.fullmatch(rf"{prefix}-custom-[0-9a-f]{{10}}", kinds[0])
        assert re.fullmatch(rf"{prefix}-native-[0-9a-f]{{10}}", kinds[1])
    assert not list((install.cache / "parsl-chat" / "wheels").glob("*.partial.*"))


def test_a_failed_llama_server_build_falls_back_with_one_line_and_is_not_retried(tmp_path: Path) -> None:
    install = FakeInstall(tmp_path)
    out, calls = install(cmake_fails=True)
    lines = [line for line in out.splitlines() if "llama-server could not be built" in line]
    assert len(lines) == 1 and "no C++17 compiler" in lines[0] and "llama-cpp-python's server" in lines[0]
    assert [c for c in calls if " install " in c], "the install stopped with the failed llama-server"
    record = json.loads(install.record.read_text())
    assert "no C++17 compiler" in record["error"] and "server" not in record
    assert install.servers() == []

    out, calls = install()
    assert not [c for c in calls if " wheel " in c] and not install.cmake_calls(), "tried again on every install"
    assert "remove " in out and "/failed to try again" in out


@pytest.mark.model
def test_installed_llama_cpp_is_portable_unless_built_native() -> None:
    kind = installed_kind()
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    # a child process: a build for another CPU would kill it with SIGILL, not pytest
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import llama_cpp {srv.describe_exit(result.returncode)}: {result.stderr[-2000:]}"
    features = srv.llama_build_features(result.stdout)
    assert features, f"no system info from llama_cpp: {result.stdout!r}"
    if kind in ("native", "custom"):
        assert not srv.unsupported_features(features), f"a {kind} build for another CPU: {features}"
        return
    beyond = [f for f in features if f in crash._CPU_FLAGS and f not in PORTABLE]
    assert not beyond, (
        f"llama-cpp-python ({kind}) was compiled with {', '.join(beyond)}: it dies with SIGILL on CPUs "
        "without them. Rebuild it portable: scripts/install (or scripts/install --native on purpose)"
    )
    if platform.machine() == "x86_64":
        assert {"AVX", "AVX2", "FMA", "F16C"} <= set(features), f"the portable baseline is missing: {features}"
