"""One model server per node under a scheduler: started once under an ``fcntl.flock`` lock, found via ``server.json``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from .._files import atomic_write
from .._processes import pid_alive, proc_start_time
from ..config import ServerConfig
from ..errors import ServerError, ServerLost
from .crash import log_tail
from .health import accepts_connections
from .server import STOP_GRACE_S, ModelServer, node_name

__all__ = ["keep_crash_log", "node_server", "node_state_dir", "stop_node_server"]

logger = logging.getLogger("parsl_chat.serve.server")  # the name it logged under before the split

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
            if pid_alive(int(state["pid"]), state.get("start_time")) and accepts_connections(state["url"]):
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
            "start_time": proc_start_time(server.pid),
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
    tail = log_tail(folder / "server.log")
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


def _kill_recorded(state: dict[str, Any], grace_s: float = STOP_GRACE_S) -> bool:
    """Stop a server recorded in server.json that may belong to another process."""
    pid = int(state["pid"])
    start_time = state.get("start_time")
    if not pid_alive(pid, start_time):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not pid_alive(pid, start_time):
                return True
            time.sleep(0.05)
    return not pid_alive(pid, start_time)


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
