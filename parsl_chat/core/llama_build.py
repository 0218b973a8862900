"""llama.cpp's own ``llama-server``: where scripts/install put it, and how big to run it.

``scripts/install`` compiles ``llama-server`` and ``llama-batched-bench`` from the
llama.cpp sources vendored in the pinned llama-cpp-python sdist, in the same cmake
build as the llama-cpp-python wheel (so llama.cpp is compiled once), into
``~/.cache/parsl-chat/llama-server/<version>-<arch>-<kind>/``, one folder per kind
of build (portable, native-<cpu>, custom-<CMAKE_ARGS hash>) like the wheels. It then
records which build this Python environment uses in :data:`BUILD_RECORD` (or, when
the build failed, why), because the kind chosen at install time is not knowable later.

Unlike llama-cpp-python's server, which answers one request at a time, llama-server
runs N parallel slots with continuous batching: :func:`job_cores` and
:func:`slot_count` size it from the cores the job really has.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import ServerConfig, Settings
from ..errors import ServerError

__all__ = [
    "BUILD_RECORD",
    "OPENMP_SPIN_COUNT",
    "EmbeddedPlan",
    "LlamaBuild",
    "embedded_plan",
    "embedded_slots_share",
    "find_llama_build",
    "job_cores",
    "slot_count",
    "thread_counts",
]

#: written by scripts/install: the llama-server build this Python environment uses
BUILD_RECORD = Path(sys.prefix) / "share" / "parsl-chat" / "llama-server.json"
#: tiny model: syncing many threads per token costs more than it gains (cap not measured here)
MAX_THREADS = 8
#: parallel slots per core: continuous batching turns several sequences into one matrix
#: product per step, which a core does at nearly the cost of one (measured: BENCHMARKS.md §8)
SLOTS_PER_CORE = 4
MAX_SLOTS = 32
#: rounds libgomp's threads spin at a barrier before they sleep (its default, 300,000, is about
#: a millisecond): then a thread descheduled by another process no longer costs the others a
#: whole time slice at every barrier, and all-core batches degrade gently (BENCHMARKS.md §8)
OPENMP_SPIN_COUNT = 1000


@dataclass(frozen=True)
class LlamaBuild:
    """One llama-server build: its programs and how it was made."""

    server: Path
    batched_bench: Path | None
    kind: str  # portable | native-<cpu hash> | custom-<CMAKE_ARGS hash>
    cmake_args: str
    version: str  # the llama-cpp-python version whose vendored llama.cpp it is
    #: llama.cpp's system info of the build (``CPU : SSE3 = 1 | AVX2 = 1 | ...``), read at install
    #: time: llama-server prints it only at trace verbosity
    system_info: str = ""

    @property
    def openmp(self) -> bool:
        """Whether its threads meet at OpenMP barriers (libgomp's spin count then applies)."""
        return "OPENMP = 1" in self.system_info

    def describe(self) -> str:
        return f"llama-server {self.kind} build (llama-cpp-python {self.version} sources, CMAKE_ARGS={self.cmake_args})"


def find_llama_build(record: Path | None = None) -> tuple[LlamaBuild | None, str]:
    """The llama-server build scripts/install recorded, or (None, why there is none)."""
    path = BUILD_RECORD if record is None else record
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"scripts/install has not built llama-server for this Python environment ({path} is missing)"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    if not isinstance(data, dict):
        return None, f"{path} is not a llama-server build record"
    if data.get("error"):
        return None, f"scripts/install could not build it: {data['error']}"
    server = Path(str(data.get("server", "")))
    if not (server.is_file() and os.access(server, os.X_OK)):
        return None, f"the recorded llama-server {server} is missing (a cleared cache?): run scripts/install again"
    bench = Path(str(data["batched_bench"])) if data.get("batched_bench") else None
    build = LlamaBuild(
        server=server,
        batched_bench=bench if bench is not None and bench.is_file() else None,
        kind=str(data.get("kind", "?")),
        cmake_args=str(data.get("cmake_args", "")),
        version=str(data.get("version", "?")),
        system_info=str(data.get("system_info", "")),
    )
    return build, ""


def require_llama_build() -> LlamaBuild:
    """The recorded build, or ServerError saying why there is none (server.engine: llama-server)."""
    build, why = find_llama_build()
    if build is None:
        raise ServerError(f"server.engine is llama-server, but {why}", hint="run scripts/install, or set server.engine: auto")
    return build


# --------------------------------------------------------------------------- cores


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_quota_files(root: Path) -> list[tuple[Path, Path | None]]:
    """Where this process's CPU quota may be: (quota file, period file or None for v2's one-file form)."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    files: list[tuple[Path, Path | None]] = []
    for line in own:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if not controllers:  # cgroup v2: "0::/path"
            files += [(root / rel / "cpu.max", None), (root / "cpu.max", None)]
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            for base in (root / "cpu" / rel, root / "cpu"):
                files.append((base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    return files


def _cgroup_cores(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), None if it has none.

    Inside a container the path in /proc/self/cgroup may not exist (its own namespace):
    then the root's files are this cgroup's.
    """
    for quota_file, period_file in _cgroup_quota_files(root):
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(1, math.ceil(int(quota) / int(period)))
        except (ValueError, ZeroDivisionError):
            continue
    return None


def job_cores(env: dict[str, str] | None = None) -> int:
    """The cores this job may really use: the least of SLURM's allocation on this node,
    the cgroup's CPU quota and the CPU affinity mask, never the node's total.

    SLURM_CPUS_ON_NODE counts the job's CPUs even when the node's cgroup plugin is off
    (then affinity and cgroup still show the whole node).
    """
    environ = os.environ if env is None else env
    limits = [_affinity_cores()]
    slurm = environ.get("SLURM_CPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(int(slurm))
    quota = _cgroup_cores()
    if quota is not None:
        limits.append(quota)
    return max(1, min(limits))


def thread_counts(cores: int, build: LlamaBuild | None = None) -> tuple[int, int]:
    """llama.cpp threads for generating tokens and for reading prompts, on ``cores`` cores.

    Generating one sequence leaves one core to the HTTP server and the clients: its steps are
    small, and a thread descheduled by another process stalls the others at every barrier.
    llama.cpp runs every batch of more than one token on the prompt threads, and llama-server's
    slots decode as one batch, so with ``build`` those are generation threads too. They take
    every core when the build waits at its barriers with OpenMP and :data:`OPENMP_SPIN_COUNT`
    (8 slots on 2 cores, BENCHMARKS.md §8: 1.8x one thread alone, 0.85x of it beside a busy
    process); ggml's own thread pool spins until the others arrive, so without OpenMP they
    leave the client's core (2 of them stalled 2 quickstarts of 6 there).
    """
    generation = max(1, min(cores - 1, MAX_THREADS))
    if build is not None and not build.openmp:
        return generation, generation
    return generation, max(1, min(cores, MAX_THREADS))


def slot_count(cores: int, configured: int = 0) -> int:
    """Parallel slots for llama-server: ``configured`` if set, else :data:`SLOTS_PER_CORE` per core."""
    if configured > 0:
        return configured
    return max(2, min(SLOTS_PER_CORE * cores, MAX_SLOTS))


# --------------------------------------------------------------------------- what the embedded server runs


@dataclass(frozen=True)
class EmbeddedPlan:
    """How the embedded model server runs here: which program, how many slots and threads."""

    build: LlamaBuild | None  # None: llama-cpp-python's server
    fallback: str  # why llama-cpp-python's server runs instead of llama-server ("" if it does not)
    cores: int
    slots: int  # requests answered at once (llama-cpp-python's server: 1)
    threads: int  # generation
    batch_threads: int  # prompt processing

    @property
    def engine(self) -> str:
        return "llama-server" if self.build is not None else "llama-cpp-python"

    @property
    def environment(self) -> dict[str, str]:
        """What the server process's environment needs for these threads."""
        if self.build is None or not self.build.openmp:
            return {}
        return {"GOMP_SPINCOUNT": str(OPENMP_SPIN_COUNT)}

    def describe(self) -> str:
        """One line for ``serve`` and the logs: ``llama-server: 8 slots (continuous batching), 1+2 threads on 2 cores``."""
        threads = f"{self.threads} generation + {self.batch_threads} prompt threads on {self.cores} cores"
        if self.build is None:
            return f"llama-cpp-python's server: 1 request at a time, {threads}"
        return f"llama-server ({self.build.kind} build): {self.slots} slots with continuous batching, {threads}"


def embedded_plan(cfg: ServerConfig, env: dict[str, str] | None = None, cores: int | None = None) -> EmbeddedPlan:
    """The embedded server's program and size for ``cfg`` on this node, or on ``cores`` cores
    (raises ServerError if ``cfg.engine`` names a program that cannot be had)."""
    cores = job_cores(env) if cores is None else cores
    if cfg.engine == "llama-cpp-python":
        build, why = None, "server.engine is llama-cpp-python"
    elif cfg.engine == "llama-server":
        build, why = require_llama_build(), ""
    else:
        build, why = find_llama_build()
    threads, batch_threads = thread_counts(cores, build)
    threads, batch_threads = cfg.threads or threads, cfg.batch_threads or batch_threads
    slots = slot_count(cores, cfg.slots) if build is not None else 1
    return EmbeddedPlan(build, why, cores, slots, threads, batch_threads)


def embedded_slots_share(settings: Settings, agents_on_server: int, servers: tuple[int, int | None] = (1, None)) -> int | None:
    """Each agent's default concurrency when ``agents_on_server`` agents share the embedded servers.

    The agents together fill every slot of every node's server (the ceiling of an even
    share, so no slot starves): fewer requests in flight leave slots idle, more only wait
    in the server's queue. None when the user set ``limits.concurrency`` or the embedded
    server is not used. ``servers``: how many nodes run one, and their cores when the
    profile says (else this machine's: the nodes' are unknown here); the run's target
    knows both (``backends.targets.model_servers``).
    """
    run = settings.run
    if run.server.kind != "embedded" or agents_on_server < 1 or settings.source_of("limits.concurrency").kind != "default":
        return None
    nodes, cores = servers
    slots = embedded_plan(run.server, cores=cores).slots
    return max(1, math.ceil(slots * nodes / agents_on_server))
