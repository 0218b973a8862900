"""Chunks as Parsl apps: the profile turned into a running HighThroughputExecutor.

The profile's target (:mod:`.targets`) builds the provider; :class:`ParslBackend` wraps the
resulting DataFlowKernel behind the :class:`~parsl_chat.backends.Backend` interface, and
remembers the scheduler jobs it started so that a later ``cleanup`` can cancel them if
this driver dies.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from ..config import ProfileConfig
from ..errors import ExecutorError
from ..io.rows import LedgerRow
from ..worker.executor import ChunkTask, iso, run_chunk, warm_worker
from .targets import python_bin_on_path, target_for, total_workers

__all__ = ["ParslBackend", "build_parsl_config"]

log = logging.getLogger("parsl_chat.backends.profiles")  # the name the run's log has always shown


def _interchange_address(profile: ProfileConfig) -> str:
    if profile.address:
        return profile.address
    if target_for(profile).workers_on_driver:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


#: Runs a command in a new session: ``os.setsid()``, then exec (same pid, so Parsl and cleanup see the interchange itself).
_NEW_SESSION = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


def _interchange_launch_cmd() -> list[str]:
    """Parsl's interchange command, started in a session of its own.

    A terminal's Ctrl-C or hang-up goes to every process of the foreground
    group, not to the driver alone. The driver stops cleanly on its own and
    ends the interchange; an interchange killed by that signal instead left
    Parsl waiting for it forever. Ignoring the signals around ``parsl.load``
    cannot do this where Parsl starts in a thread (the warm start): only the
    main thread may change signal dispositions. Parsl's local worker pools
    already run in their own process group.
    """
    from parsl.executors.high_throughput.executor import DEFAULT_INTERCHANGE_LAUNCH_CMD

    return [sys.executable, "-c", _NEW_SESSION, *DEFAULT_INTERCHANGE_LAUNCH_CMD]


#: How long (ms) Parsl's interchange and the driver's result thread wait on their sockets before they
#: look again. A message wakes them at once, so this only paces their housekeeping (and, at the end,
#: how long shutdown waits for the result thread). Parsl's default, 10, wakes each of them 100 times a
#: second; on a node whose cores its model server needs, each wakeup can preempt one of llama.cpp's
#: threads at a barrier: 100 gave the embedded server 1.05-1.07x the tokens/s of 10 (BENCHMARKS.md, 8).
POLL_PERIOD_MS = 100


def build_parsl_config(profile: ProfileConfig, run_id: str, parsl_dir: Path) -> Any:
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor

    target = target_for(profile)
    provider = target.provider(profile, run_id)  # first: its checks (sbatch on PATH, the cluster) fail fast
    htex = HighThroughputExecutor(
        label=f"htex-{run_id[-8:]}",
        address=_interchange_address(profile),
        interchange_launch_cmd=_interchange_launch_cmd(),
        provider=provider,
        max_workers_per_node=profile.workers,
        cores_per_worker=0.01,  # requests are I/O-bound: the worker count is set explicitly
        prefetch_capacity=1,  # the next chunk waits at the node, not in the interchange
        heartbeat_period=5,
        heartbeat_threshold=30,
        poll_period=POLL_PERIOD_MS,
        worker_logdir_root=target.worker_logdir or str(parsl_dir / "workers"),
        # per-run CurveZMQ keys: an interchange orphaned by a killed driver can never
        # be joined by the next run's workers when ports are reused
        encrypted=True,
    )
    return Config(
        executors=[htex],
        run_dir=str(parsl_dir),
        strategy=profile.strategy,  # "none", "simple" or "htex_auto_scale", as Parsl names them
        strategy_period=profile.strategy_period_s,
        max_idletime=profile.max_idletime_s,
        retries=0,  # the driver re-queues lost chunks itself, with exactly-once bookkeeping
        usage_tracking=0,
    )


#: Parsl's scaling period while it starts (see :meth:`ParslBackend.start`)
FIRST_TICK_S = 0.05


class ParslBackend:
    """Chunks run as Parsl apps on a HighThroughputExecutor built from the profile."""

    label = "parsl"

    def __init__(self, profile: ProfileConfig, run_id: str, parsl_dir: Path) -> None:
        self.profile = profile
        self.run_id = run_id
        self.parsl_dir = parsl_dir
        self.workers = total_workers(profile)
        self.label = profile.executor
        self.target = target_for(profile)
        self._dfk: Any = None
        self._app: Any = None
        self._submitted: dict[str, float] = {}
        self._ended: dict[str, float] = {}
        self._job_ids: dict[str, str] = {}
        self._nodes: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"ParslBackend(executor={self.profile.executor!r}, workers={self.workers})"

    def start(self) -> None:
        import parsl
        from parsl import python_app

        os.environ["PATH"] = python_bin_on_path() + os.pathsep + os.environ.get("PATH", "")
        self.parsl_dir.mkdir(parents=True, exist_ok=True)
        config = build_parsl_config(self.profile, self.run_id, self.parsl_dir)
        # Parsl's scaling thread ticks every FIRST_TICK_S until the executor is in, so that it launches
        # the first block at once; then every strategy_period_s (set below). Calling the strategy from
        # this thread instead raced that thread's own tick: two blocks where max_blocks was 1.
        config.strategy_period = FIRST_TICK_S
        # Parsl logs to the root logger at DEBUG; keep that in logs/, off the terminal
        for name in ("parsl",):
            logging.getLogger(name).propagate = False
        try:
            self._dfk = parsl.load(config)
        except Exception as exc:  # Parsl raises many types here; all mean "could not start"
            raise ExecutorError(f"could not start the Parsl executor ({self.profile.executor}): {exc}") from exc
        self._app = python_app(run_chunk, executors=[config.executors[0].label], data_flow_kernel=self._dfk)
        poller = getattr(self._dfk, "job_status_poller", None)
        if poller is not None:
            poller.interval = self.profile.strategy_period_s  # read before each wait: after the next tick

    @property
    def executor(self) -> Any:
        return self._dfk.executors[f"htex-{self.run_id[-8:]}"] if self._dfk else None

    def submit(self, task: ChunkTask) -> Future[list[LedgerRow]]:
        future: Future[list[LedgerRow]] = self._app(task)
        return future

    def warm_up(self) -> list[Future[int]]:
        """One no-op task per worker: done once workers have started and imported parsl-chat."""
        from parsl import python_app

        app = python_app(warm_worker, executors=[self._app.executors[0]], data_flow_kernel=self._dfk)
        return [app() for _ in range(max(1, self.workers))]

    def all_submitted(self) -> None:
        pass  # Parsl's blocks scale down by its own strategy

    def note_rows(self, rows: list[LedgerRow]) -> None:
        for row in rows:
            block, node = row.get("block"), row.get("node")
            if block is not None and node:
                self._nodes.setdefault(str(block), set()).add(node)

    def blocks(self) -> list[dict[str, Any]]:
        """Blocks started so far with their scheduler job ids (kept in run.json for cleanup)."""
        htex = self.executor
        now = time.time()
        if htex is not None:
            for block, job_id in list(htex.blocks_to_job_id.items()):
                self._submitted.setdefault(block, now)
                self._job_ids[block] = job_id
        return [
            {
                "block": str(block),
                "job_id": self.target.job_id(job_id),
                "submitted_at": iso(self._submitted[block]),
                "ended_at": iso(self._ended.get(block)),
                "nodes": sorted(self._nodes.get(str(block), set())),
                "cores_per_node": self.profile.cores_per_node,
            }
            for block, job_id in self._job_ids.items()
        ]

    def processes(self) -> list[dict[str, Any]]:
        """Local processes a SIGKILLed driver would orphan: the interchange, and local blocks' worker pools."""
        htex = self.executor
        if htex is None:
            return []
        pids = []
        interchange = getattr(htex, "interchange_proc", None)
        if interchange is not None:
            pids.append(("interchange", interchange.pid))
        if self.target.local_blocks:
            pids += [("block", int(j)) for j in self._job_ids.values() if str(j).isdigit()]
        out = []
        for role, pid in pids:
            try:
                out.append({"role": role, "pid": pid, "started": psutil.Process(pid).create_time()})
            except psutil.Error:
                continue
        return out

    def shutdown(self) -> None:
        if self._dfk is None:
            return
        self.blocks()  # remember the job ids before Parsl forgets them
        blocks_before = dict(self._job_ids)
        provider = getattr(self.executor, "provider", None)
        try:
            self._dfk.cleanup()
        except Exception as exc:  # cleanup must not mask the run's own outcome
            log.warning("Parsl cleanup failed: %s", exc)
        finally:
            import parsl

            parsl.clear()
            now = time.time()
            for block in blocks_before:
                self._ended.setdefault(block, now)
            self.target.after_shutdown(provider, [j for j in blocks_before.values() if j])
            self._dfk = None
