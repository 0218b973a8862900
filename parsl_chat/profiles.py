"""Turning a profile into a running Parsl executor.

One function per executor kind builds the provider; :class:`ParslBackend`
wraps the resulting DataFlowKernel behind the same small interface as the
in-process backend, and remembers the scheduler jobs it started so that a
later ``cleanup`` can cancel them if this driver dies.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from .config import ProfileConfig
from .errors import ExecutorError
from .executor import ChunkTask, iso, run_chunk, warm_worker

__all__ = ["ParslBackend", "allocation_nodes", "build_parsl_config", "plan_lines", "total_workers"]

log = logging.getLogger("parsl_chat.profiles")


def allocation_nodes() -> int:
    """Nodes of the SLURM allocation this process runs in (``slurm-allocation``)."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    raise ExecutorError(
        "profile 'slurm-allocation' runs inside a SLURM job, but no SLURM allocation was found (SLURM_JOB_NUM_NODES unset)",
        hint="submit with 'sbatch jobs/chat_batch.sh PROMPTS', or use --profile slurm to let parsl-chat submit jobs",
    )


def nodes_per_block(profile: ProfileConfig) -> int:
    if profile.executor == "slurm-allocation":
        return allocation_nodes()
    if profile.executor == "local":
        return 1
    return profile.nodes_per_block


def total_workers(profile: ProfileConfig) -> int:
    """Worker processes when every block the profile allows is running."""
    blocks = 1 if profile.executor in ("local", "slurm-allocation") else profile.max_blocks
    return profile.workers * nodes_per_block(profile) * blocks


def plan_lines(profile: ProfileConfig) -> list[str]:
    """Human description of where work will run, for --dry-run."""
    npb = nodes_per_block(profile)
    if profile.executor == "local":
        return [f"executor: local (Parsl HighThroughputExecutor on this machine), {profile.workers} worker processes"]
    if profile.executor == "slurm-allocation":
        return [
            f"executor: slurm-allocation (inside job {os.environ.get('SLURM_JOB_ID', '?')}): "
            f"1 block of {npb} node(s), {profile.workers} workers per node, no further submission"
        ]
    if profile.executor == "slurm":
        where = f"partition {profile.partition or '(default)'}" + (f", account {profile.account}" if profile.account else "")
        return [
            f"executor: slurm, {where}, walltime {profile.walltime}",
            f"blocks: init {profile.init_blocks}, min {profile.min_blocks}, max {profile.max_blocks}; "
            f"{npb} node(s) per block; {profile.workers} workers per node "
            f"(up to {total_workers(profile)} workers)",
        ]
    return [
        f"executor: kubernetes, namespace {profile.namespace}, image {profile.image}",
        f"blocks (pods): init {profile.init_blocks}, max {profile.max_blocks}; {profile.workers} workers per pod; "
        f"pod cpu {profile.pod_cpu}, memory {profile.pod_memory}",
    ]


def _interchange_address(profile: ProfileConfig) -> str:
    if profile.address:
        return profile.address
    if profile.executor in ("local",):
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


def _python_bin_on_path() -> str:
    """Parsl starts the interchange and workers by name: this Python's bin/ must be on PATH."""
    return str(Path(sys.executable).parent)


def _slurm_provider(profile: ProfileConfig) -> Any:
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider

    if shutil.which("sbatch") is None:
        raise ExecutorError(
            "profile 'slurm' needs the SLURM commands (sbatch, squeue), which are not on PATH",
            hint="run it on a login node of your cluster, or start the dev cluster: scripts/slurm-dev-cluster start",
        )
    poll = profile.status_polling_s

    class _Provider(SlurmProvider):  # type: ignore[misc]
        # Parsl polls squeue every 60 s by default: the first result would wait that long
        @property
        def status_polling_interval(self) -> int:
            return poll

    return _Provider(
        partition=profile.partition,
        account=profile.account,
        qos=profile.qos,
        nodes_per_block=profile.nodes_per_block,
        cores_per_node=profile.cores_per_node,
        mem_per_node=int(profile.mem_per_node_gb) if profile.mem_per_node_gb else None,
        init_blocks=profile.init_blocks,
        min_blocks=profile.min_blocks,
        max_blocks=profile.max_blocks,
        walltime=profile.walltime,
        scheduler_options=profile.scheduler_options,
        worker_init=_worker_init(profile),
        exclusive=profile.exclusive,
        launcher=SrunLauncher(overrides="--ntasks-per-node=1"),
    )


def _worker_init(profile: ProfileConfig) -> str:
    # jobs run process_worker_pool.py by name: put this Python first unless the user set it up
    return profile.worker_init or f"export PATH={_python_bin_on_path()}:$PATH"


def _allocation_provider(profile: ProfileConfig) -> Any:
    from parsl.launchers import SrunLauncher
    from parsl.providers import LocalProvider

    return LocalProvider(
        nodes_per_block=allocation_nodes(),
        launcher=SrunLauncher(overrides="--ntasks-per-node=1"),
        init_blocks=1,
        min_blocks=1,
        max_blocks=1,
        worker_init=_worker_init(profile),
    )


def _kubernetes_provider(profile: ProfileConfig, run_id: str) -> Any:
    from .kube import kubernetes_provider

    # the run id names and labels the pods, so `parsl-chat cleanup` can find them
    return kubernetes_provider(profile, _worker_init(profile), run_id)


def build_parsl_config(profile: ProfileConfig, run_id: str, parsl_dir: Path) -> Any:
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    if profile.executor == "local":
        provider: Any = LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, worker_init=profile.worker_init)
    elif profile.executor == "slurm":
        provider = _slurm_provider(profile)
    elif profile.executor == "slurm-allocation":
        provider = _allocation_provider(profile)
    else:
        provider = _kubernetes_provider(profile, run_id)
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
        poll_period=10,
        # pods have no access to the driver's run directory
        worker_logdir_root="/tmp/parsl-chat-workers" if profile.executor == "kubernetes" else str(parsl_dir / "workers"),
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

        os.environ["PATH"] = _python_bin_on_path() + os.pathsep + os.environ.get("PATH", "")
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

    def submit(self, task: ChunkTask) -> Future[list[dict[str, Any]]]:
        future: Future[list[dict[str, Any]]] = self._app(task)
        return future

    def warm_up(self) -> list[Future[int]]:
        """One no-op task per worker: done once workers have started and imported parsl-chat."""
        from parsl import python_app

        app = python_app(warm_worker, executors=[self._app.executors[0]], data_flow_kernel=self._dfk)
        return [app() for _ in range(max(1, self.workers))]

    def note_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            block = row.get("block")
            if block is not None and row.get("node"):
                self._nodes.setdefault(str(block), set()).add(row["node"])

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
                "job_id": self._job_id_of(job_id),
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
        if self.profile.executor in ("local", "slurm-allocation"):
            pids += [("block", int(j)) for j in self._job_ids.values() if str(j).isdigit()]
        out = []
        for role, pid in pids:
            try:
                out.append({"role": role, "pid": pid, "started": psutil.Process(pid).create_time()})
            except psutil.Error:
                continue
        return out

    def _job_id_of(self, provider_job_id: str) -> str | None:
        """The scheduler job a block runs in (LocalProvider's ids are process ids, not jobs)."""
        if self.profile.executor == "slurm-allocation":
            return os.environ.get("SLURM_JOB_ID")
        if self.profile.executor == "local":
            return None
        return str(provider_job_id)

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
            if self.profile.executor == "slurm":
                cancel_slurm_jobs([j for j in blocks_before.values() if j])
            elif self.profile.executor == "kubernetes":
                from .kube import delete_provider_pods

                delete_provider_pods(provider)  # Parsl leaves Failed pods, and all of a bad-state executor's
            self._dfk = None


def cancel_slurm_jobs(job_ids: list[str]) -> list[str]:
    """scancel the given jobs that are still queued or running; returns those cancelled."""
    if not job_ids or shutil.which("squeue") is None:
        return []
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=20
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = list(job_ids)
    alive = [j for j in job_ids if j in out]
    if alive:
        subprocess.run(["scancel", *alive], capture_output=True, timeout=20)
    return alive
