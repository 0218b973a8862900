"""Why a model server died, in words: exit status, log end (secrets redacted), CPU features a build lacks."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from .._secrets import SECRET_WORDS

__all__ = [
    "LAUNCH_MARK",
    "describe_exit",
    "illegal_instruction",
    "launch_log",
    "llama_build_features",
    "log_tail",
    "unsupported_features",
]

_SIGNAL_WORDS = {
    signal.SIGILL: "illegal instruction: the binary does not support this CPU",
    signal.SIGSEGV: "segmentation fault: the server or one of its native libraries crashed",
    signal.SIGBUS: "bus error: often a model file changed or truncated while mapped",
    signal.SIGABRT: "aborted: the server hit a fatal internal error",
    signal.SIGFPE: "arithmetic fault in native code",
    signal.SIGKILL: "often the out-of-memory killer or a scheduler limit",
    signal.SIGTERM: "something asked it to stop",
    signal.SIGINT: "interrupted",
}

_SECRET_RES = (
    re.compile(rf"(?i)(--?[\w-]*{SECRET_WORDS}[\w-]*(?:=|\s+)['\"]?)([^\s'\"]+)"),  # --api-key X, --token=X
    re.compile(rf"(?i)(\b\w*{SECRET_WORDS}\w*['\"]?\s*[=:]\s*['\"]?)([^\s'\",)}}]+)"),  # api_key='X', "token": "X"
    re.compile(r"(?i)(\bbearer\s+)(\S+)"),
)

#: llama.cpp's names for the instruction sets of a build (its system info: "CPU : AVX2 = 1 | ...")
#: and the flag Linux lists in /proc/cpuinfo for each
_CPU_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX_VNNI": "avx_vnni", "AVX2": "avx2", "F16C": "f16c",
    "FMA": "fma", "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "DOTPROD": "asimddp", "SVE": "sve", "MATMUL_INT8": "i8mm", "SME": "sme",
}  # fmt: skip
_SYSTEM_INFO = re.compile(r"CPU : ((?:\w+ = \w+ \| ?)+)")

LAUNCH_MARK = "--- parsl-chat: starting"
_TAIL_LINES = 15


def describe_exit(returncode: int) -> str:
    """A process exit status in words: ``killed by SIGILL (illegal instruction: ...)``.

    Negative codes come from ``subprocess`` (killed by signal N); 128+N is how a shell
    wrapper (``sh -c``, a job script) reports the same thing.
    """
    if returncode < 0:
        return _signal_words(-returncode)
    if returncode > 128 and _signal_name(returncode - 128):
        return f"exited with status {returncode} (a shell's way of saying {_signal_words(returncode - 128)})"
    return f"exited with status {returncode}"


def _signal_name(num: int) -> str | None:
    try:
        return signal.Signals(num).name
    except ValueError:
        return None


def _signal_words(num: int) -> str:
    name = _signal_name(num) or f"signal {num}"
    words = _SIGNAL_WORDS.get(num)  # type: ignore[call-overload]
    return f"killed by {name} ({words})" if words else f"killed by {name}"


def _redact(text: str) -> str:
    """Hide values that look like credentials (vLLM, for one, logs its arguments)."""
    for pattern in _SECRET_RES:
        text = pattern.sub(r"\1***", text)
    return text


def launch_log(path: Path | None) -> str:
    """The end of a server log (64 KiB at most), from the last launch on."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if LAUNCH_MARK in data:  # logs are appended to across restarts: only this launch counts
        data = data[data.rindex(LAUNCH_MARK) :]
    return data


def log_tail(path: Path | None, lines: int = _TAIL_LINES) -> str:
    kept = [line.rstrip() for line in launch_log(path).splitlines() if line.strip()][-lines:]
    return "\n".join("  " + _redact(line) for line in kept)


def llama_build_features(text: str) -> list[str] | None:
    """The features a llama.cpp build was compiled with (``["AVX", "AVX2", ...]``), or None.

    Read from the last system-info line in ``text`` (``CPU : SSE3 = 1 | AVX2 = 1 | ...``),
    which llama-cpp-python (our shim, then its verbose start) and llama-server print.
    """
    found = _SYSTEM_INFO.findall(text)
    if not found:
        return None
    return [name for name, value in re.findall(r"(\w+) = (\w+)", found[-1]) if value == "1"]


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            return set(value.split())
    return None


def unsupported_features(features: list[str], cpu_flags: set[str] | None = None) -> list[str] | None:
    """The instruction sets among a build's ``features`` that this CPU (or ``cpu_flags``) lacks.

    None if the CPU's flags are unknown (no /proc/cpuinfo).
    """
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if flags is None:
        return None
    return [name for name in features if name in _CPU_FLAGS and _CPU_FLAGS[name] not in flags]


def illegal_instruction(returncode: int, log_text: str) -> str:
    """For a server killed by SIGILL: the build's instruction sets this CPU lacks, if its log says."""
    if returncode not in (-signal.SIGILL, 128 + signal.SIGILL):
        return ""
    features = llama_build_features(log_text)
    if not features:
        return ""
    missing = unsupported_features(features)
    lacks = f"; this CPU lacks {', '.join(missing)}" if missing else ""
    return f"\nThe llama.cpp build uses {' '.join(features)}{lacks}."
