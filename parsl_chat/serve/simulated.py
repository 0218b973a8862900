"""A simulated OpenAI-compatible chat endpoint with failure injection.

Used by our tests and benchmarks, and by users (``parsl-chat serve --simulate``)
to load-test a cluster setup without a GPU. It is never a product default.

Answers are deterministic (``"sim " + first 8 words of the last user message``,
padded with ``tok`` words), so a test can tell which prompt an answer belongs to.
Faults come from a :class:`FaultPlan` (rates, latency, slots) or from magic
markers in the last user message, which win over every rate:

``__bad_request__`` 400, ``__context_length__`` 400 ``context_length_exceeded``,
``__auth__`` 401, ``__server_error__`` 500, ``__hang__`` never answers,
``__slow_<ms>__`` adds that much latency.

A request with a ``response_format`` (OpenAI's spelling) is answered with JSON:
an object that matches its ``json_schema`` (every property, values made from
the prompt's words), or ``{"answer": ...}`` for ``json_object``. Two markers
spoil the first ``n`` attempts of a prompt: ``__invalid_json_<n>__`` answers
text that is not JSON, ``__wrong_schema_<n>__`` JSON that is not an object;
``rate_invalid_output`` spoils a share of all answers the same way as the former.

Where each outcome happens, chosen to look like a real server:

* 400/401 and 429 are answered on arrival, without latency and without a slot:
  validation and rate limiting sit in front of the model.
* Everything else (success, 500, hang, drop) waits for a slot when
  ``max_concurrency`` is set, then sleeps the latency, then happens.  A hung
  request keeps its slot until its client gives up, like a stuck llama.cpp slot.

Run it as ``python -m parsl_chat.serve.simulated --latency-ms 50`` or, from Python, with
:class:`SimulatedServer` (a subprocess, so load tests don't share our GIL). This
module is that command line and the subprocess; the plan and markers are in
faults.py, the aiohttp application in sim_app.py, the answers in sim_answers.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import IO, Any, Self

from ..errors import ServerError
from .faults import FaultPlan
from .sim_app import make_app, run_server

__all__ = [
    "READY_PREFIX",
    "FaultPlan",
    "SimulatedServer",
    "main",
    "make_app",
    "run_server",
]

#: The one line ``main`` prints (followed by the base URL) once it is listening.
READY_PREFIX = "parsl-chat simulated endpoint: "


def _plan_argv(plan: FaultPlan) -> list[str]:
    argv: list[str] = []
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if value is None:
            continue
        argv += ["--" + f.name.replace("_", "-"), repr(value) if isinstance(value, float) else str(value)]
    return argv


def _contents(file: IO[bytes]) -> bytes:
    """All of a file the child writes to, read without moving the offset it shares with the child.

    seek(0) + read() would move that offset: print() writes a line and its newline
    separately, and a seek between the two put the newline over the line's first
    byte, so the ready line was never seen (CI, twice).
    """
    return os.pread(file.fileno(), os.fstat(file.fileno()).st_size, 0)


def _process_state(pid: int) -> str:
    """The kernel's view of a process (``State`` and where it sleeps), for a start-up that hangs."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return "state unknown"
    state = next((line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("State:")), "?")
    return f"state {state}, waiting in {wchan}"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data: bytes = response.read()
        return data


class SimulatedServer:
    """The simulated endpoint in a child process (``python -m parsl_chat.serve.simulated``).

    A subprocess, so a load test's client and the server don't share one GIL::

        with SimulatedServer(FaultPlan(latency_ms=20)) as server:
            client = openai.OpenAI(base_url=server.url, api_key="x")
    """

    def __init__(
        self,
        plan: FaultPlan | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 15.0,
    ) -> None:
        self.plan = plan if plan is not None else FaultPlan()
        self.log_path = log_path
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._url: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._final_log: list[dict[str, Any]] | None = None
        self._health_error = "not asked yet"

    @property
    def url(self) -> str:
        """Base URL ending in ``/v1``, for an OpenAI client's ``base_url``."""
        if self._url is None:
            raise ServerError("the simulated server is not running; call start() first")
        return self._url

    @property
    def root_url(self) -> str:
        return self.url[: -len("/v1")]

    def argv(self) -> list[str]:
        """The child's command line."""
        argv = [
            sys.executable,
            "-m",
            "parsl_chat.serve.simulated",
            *_plan_argv(self.plan),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.log_path is not None:
            argv += ["--log-path", os.fspath(self.log_path)]
        return argv

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        # A source checkout must be importable from any cwd; an installed package already is
        # (and putting site-packages on PYTHONPATH would let it shadow the stdlib).
        if Path(root).name not in ("site-packages", "dist-packages"):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def start(self) -> Self:
        """Start the child and wait (bounded) until it listens and ``/health`` answers."""
        if self._proc is not None:
            raise ServerError("the simulated server is already running")
        self._final_log = None
        # Files, not pipes: a chatty child can never block on a full pipe nobody reads.
        self._stdout = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr, env=self._env()
        )
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while (url := self._ready_url()) is None:
                self._check_alive_until(deadline, "it printed no ready line")
                time.sleep(0.02)
            self._url = url
            while not self._healthy():
                self._check_alive_until(deadline, f"{self.root_url}/health did not answer ok ({self._health_error})")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready_url(self) -> str | None:
        assert self._stdout is not None
        for line in _contents(self._stdout).decode(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
        return None

    def _healthy(self) -> bool:
        try:
            answer = json.loads(_http_get(self.root_url + "/health", 2.0))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._health_error = f"{type(exc).__name__}: {exc}"
            return False
        self._health_error = f"answered {answer!r}"
        return isinstance(answer, dict) and answer.get("status") == "ok"

    def _check_alive_until(self, deadline: float, waiting_for: str) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise ServerError(
                f"the simulated server exited with code {code} before it was ready{self._stderr_tail()}",
                hint="check the FaultPlan and the host/port",
            )
        if time.monotonic() > deadline:
            state = _process_state(self._proc.pid)
            # The child dumps its Python stacks on SIGUSR1 (faulthandler): show where it is stuck.
            self._proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            raise ServerError(
                f"the simulated server (pid {self._proc.pid}, {state}) was not ready after "
                f"{self.startup_timeout_s:g} s: {waiting_for}{self._stderr_tail(6000)}"
            )

    def _stderr_tail(self, max_chars: int = 2000) -> str:
        if self._stderr is None:
            return ""
        tail = _contents(self._stderr).decode(errors="replace")[-max_chars:].strip()
        return f":\n{tail}" if tail else ""

    def requests(self) -> list[dict[str, Any]]:
        """The request log: live from ``/_requests``, else from ``log_path``, else as it was at stop()."""
        if self._url is not None and self._proc is not None and self._proc.poll() is None:
            try:
                data: list[dict[str, Any]] = json.loads(_http_get(self.root_url + "/_requests", 10.0))
                return data
            except (OSError, http.client.HTTPException, ValueError):
                pass  # gone meanwhile: fall back below
        if self.log_path is not None and os.path.exists(self.log_path):
            with open(self.log_path, encoding="utf-8") as f:
                # The last line may be half-written if the server was killed mid-write.
                return [json.loads(line) for line in f if line.endswith("\n")]
        if self._final_log is not None:
            return list(self._final_log)
        raise ServerError("the simulated server is not running and has no log_path to read requests from")

    def stop(self) -> None:
        """SIGTERM, then kill after 5 s. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if self.log_path is None and self._url is not None:
                try:  # keep the log readable after stop() when there is no file
                    self._final_log = json.loads(_http_get(self.root_url + "/_requests", 2.0))
                except (OSError, http.client.HTTPException, ValueError):
                    pass
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for f in (self._stdout, self._stderr):
            if f is not None:
                f.close()
        self._stdout = self._stderr = None
        self._url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatedServer(url={self._url!r}, plan={self.plan!r})"


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parsl_chat.serve.simulated",
        description="Simulated OpenAI-compatible chat endpoint with failure injection.",
    )
    d = FaultPlan()
    p.add_argument("--latency-ms", type=float, default=d.latency_ms, help="fixed delay per request")
    p.add_argument("--jitter-ms", type=float, default=d.jitter_ms, help="uniform extra delay in [0, N]")
    p.add_argument("--rate-500", type=float, default=d.rate_500, help="fraction answered 500")
    p.add_argument("--rate-429", type=float, default=d.rate_429, help="fraction answered 429 with Retry-After")
    p.add_argument("--retry-after-s", type=float, default=d.retry_after_s, help="Retry-After of a 429")
    p.add_argument("--rate-hang", type=float, default=d.rate_hang, help="fraction never answered")
    p.add_argument("--rate-drop", type=float, default=d.rate_drop, help="fraction whose connection is dropped")
    p.add_argument("--completion-tokens", type=int, default=d.completion_tokens, help="words per answer")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="slots; 0 = unlimited")
    p.add_argument("--model", default=d.model, help="model name served")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for deterministic fault draws")
    p.add_argument(
        "--fail-first-attempts",
        type=int,
        default=d.fail_first_attempts,
        help="500 on the first N attempts of each distinct prompt",
    )
    p.add_argument(
        "--rate-invalid-output",
        type=float,
        default=d.rate_invalid_output,
        help="fraction answered with text that is not JSON (structured-output tests)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    p.add_argument("--log-path", default=None, help="append every request here as a JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; prints one ``READY_PREFIX + base_url`` line when listening."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    fields = {f.name for f in dataclasses.fields(FaultPlan)}
    try:
        plan = FaultPlan(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as exc:
        parser.error(str(exc))

    # SimulatedServer asks for the stacks of a child that never gets ready
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def ready(url: str) -> None:
        print(READY_PREFIX + url, flush=True)

    try:
        run_server(plan, args.host, args.port, args.log_path, ready)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
