"""Helpers shared by the benchmarks: machine facts, prompt files, servers, timed runs, tables.

Every timed figure is the wall time of a whole process (``parsl-chat run`` or
a baseline script), from just before it is spawned to its exit, so start-up
and the final writes are included. Peak memory comes from the kernel:
``VmHWM`` of the driver (polled) and ``ru_maxrss`` from ``wait4`` (the largest
of the driver and the children it reaped).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
DEFAULT_RESULTS = BENCH_DIR / "results"


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every benchmark gets: mode, where to write, scratch space, repeats."""

    quick: bool
    results_dir: Path
    work_dir: Path
    repeats: int
    log: Callable[[str], None] = print
    keep_runs: bool = False
    notes: list[str] = field(default_factory=list)
    proposed: Path | None = None  # a parsl_chat tree with benchmarks/proposals/*.diff applied
    slurm_sizes: tuple[int, ...] | None = None  # prompts per SLURM comparison (None: the mode's default)

    def scratch(self, name: str) -> Path:
        path = self.work_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


def build_proposed_tree(work: Path, log: Callable[[str], None] = print) -> Path | None:
    """Copy parsl_chat/ and configs/ to ``work/proposed`` and apply benchmarks/proposals/*.diff there.

    Runs with ``PYTHONPATH=<tree>`` then import the patched package (workers too: they inherit the
    environment). None when a patch no longer applies (the product moved on) or when there is none.
    """
    diffs = sorted((BENCH_DIR / "proposals").glob("*.diff"))
    if not diffs:
        log("  no proposals in benchmarks/proposals/: nothing to compare against")
        return None
    tree = work / "proposed"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    shutil.copytree(REPO / "parsl_chat", tree / "parsl_chat", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", tree / "configs")
    for diff in diffs:
        done = subprocess.run(
            ["patch", "-p1", "-s", "--no-backup-if-mismatch", "-d", str(tree), "-i", str(diff)], capture_output=True, text=True
        )
        if done.returncode != 0:
            log(f"  ! {diff.name} does not apply to the current parsl_chat/: {done.stdout}{done.stderr}")
            return None
        log(f"  applied {diff.name} to a copy of parsl_chat/ in {tree}")
    return tree


def proposed_env(ctx: Context) -> dict[str, str] | None:
    if ctx.proposed is None:
        return None
    return clean_env({"PYTHONPATH": str(ctx.proposed)})


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and load: the facts BENCHMARKS.md quotes."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
        info["cpu_model"] = models[0] if models else None
        info["cpu_threads"] = len(models)
        info["cpu_mhz"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "MHz" in line), None)
        info["hypervisor"] = "hypervisor" in flags
    with contextlib.suppress(OSError):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["mem_total_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 1024**2, 1)
    with contextlib.suppress(OSError):
        info["loadavg_when_written"] = Path("/proc/loadavg").read_text().split()[:3]
    with contextlib.suppress(ImportError):
        import parsl

        info["parsl"] = parsl.__version__
    with contextlib.suppress(ImportError):
        import parsl_chat

        info["parsl_chat"] = parsl_chat.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only: which code was measured
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "parsl_chat"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            info["commit"] = head.stdout.strip() + (" + uncommitted parsl_chat/ changes" if dirty.stdout.strip() else "")
    return info


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- inputs


def write_prompts(path: Path, n: int, *, prefix: str = "p") -> Path:
    """``n`` distinct prompts as JSON Lines, written in pieces (a million lines never sit in memory)."""
    with path.open("w", encoding="utf-8") as fh:
        step = 10_000
        for start in range(0, n, step):
            fh.write(
                "".join(
                    f'{{"id": "{prefix}{i}", "prompt": "Question {i}: explain item {i} of the benchmark in one line."}}\n'
                    for i in range(start, min(n, start + step))
                )
            )
    return path


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def agents_config(
    path: Path,
    *,
    agents: int = 3,
    concurrency: int = 4,
    routing: str = "round_robin",
    endpoints: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    chunk_size: int = 0,
) -> Path:
    """A run config: ``agents`` agents (one per endpoint when given), no model server."""
    names = [f"a{i + 1}" for i in range(len(endpoints) if endpoints else agents)]
    entries: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"name": name, "system_prompt": "Be brief."}
        if endpoints:
            entry["endpoint"] = endpoints[i]
            entry["model"] = "sim"
        if params:
            entry["params"] = params
        entries.append(entry)
    limits: dict[str, Any] = {"concurrency": concurrency, "timeout_s": 120}
    if chunk_size:
        limits["chunk_size"] = chunk_size
    return write_yaml(path, {"agents": entries, "routing": routing, "limits": limits, "server": {"kind": "none"}})


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def simulated(latency_ms: float, **plan: Any) -> Iterator[Any]:
    """The simulated endpoint in its own process (``parsl-chat serve --simulate`` does the same)."""
    from parsl_chat.serve.simulated import FaultPlan, SimulatedServer

    server = SimulatedServer(FaultPlan(latency_ms=latency_ms, **plan), startup_timeout_s=60)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- timed processes


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without parsl-chat/OpenAI settings that would change what is measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARSL_CHAT_", "OPENAI_"))}
    env.update(extra or {})
    return env


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _rss_kb(pid: int) -> int | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _tree_rss_kb(pid: int) -> int:
    """Current RSS of a process and all its descendants (Parsl's interchange and workers)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total // 1024
    except Exception:
        return 0


@dataclass
class Timed:
    argv: list[str]
    t0: float  # epoch seconds just before the spawn
    wall_s: float
    rc: int
    driver_peak_rss_mb: float | None  # VmHWM of the driver process itself
    maxrss_mb: float  # ru_maxrss from wait4: max(driver, reaped children)
    tree_peak_rss_mb: float  # largest sum of RSS over the process tree seen while polling
    stdout: str
    stderr: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds after t0, driver RSS MB)

    def brief(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "rc": self.rc,
            "driver_peak_rss_mb": self.driver_peak_rss_mb,
            "maxrss_mb": self.maxrss_mb,
            "tree_peak_rss_mb": self.tree_peak_rss_mb,
        }


def timed(argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 900, cwd: Path | None = None) -> Timed:
    """Run a process to the end; wall time, exit code, peak memory, output."""
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"parsl-chat-bench-{os.getpid()}-{time.monotonic_ns()}"
    with open(f"{out_path}.out", "w+b") as out, open(f"{out_path}.err", "w+b") as err:
        t0 = time.time()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env or clean_env(), cwd=cwd)
        hwm: int | None = None
        tree = 0
        polls = 0
        samples: list[tuple[float, float]] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now_hwm = _vm_hwm_kb(proc.pid)
            if now_hwm is not None:
                hwm = now_hwm
            rss = _rss_kb(proc.pid)
            if rss is not None:
                samples.append((round(time.monotonic() - start, 2), round(rss / 1024, 1)))
            if polls % 5 == 0:  # walking the tree costs more: every 0.25 s
                tree = max(tree, _tree_rss_kb(proc.pid))
            polls += 1
            if time.monotonic() - start > timeout_s:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    for suffix in (".out", ".err"):
        with contextlib.suppress(OSError):
            os.unlink(f"{out_path}{suffix}")
    return Timed(
        argv=argv,
        t0=t0,
        wall_s=wall,
        rc=proc.returncode,
        driver_peak_rss_mb=round(hwm / 1024, 1) if hwm else None,
        maxrss_mb=round(usage.ru_maxrss / 1024, 1),
        tree_peak_rss_mb=round(tree / 1024, 1),
        stdout=stdout,
        stderr=stderr,
        samples=samples,
    )


def parsl_chat_argv(*args: str) -> list[str]:
    """``parsl-chat ARGS`` as users run it (the console script when installed)."""
    exe = shutil.which("parsl-chat")
    if exe and Path(exe).parent == Path(sys.executable).parent:
        return [exe, *args]
    return [sys.executable, "-m", "parsl_chat", *args]


def run_parsl_chat(
    ctx: Context,
    prompts: Path,
    out: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 1800,
) -> dict[str, Any]:
    """Time one ``parsl-chat run`` and read what it wrote."""
    argv = parsl_chat_argv("run", str(prompts), "--out", str(out), "--quiet", *args)
    t = timed(argv, env=env, timeout_s=timeout_s)
    result = t.brief()
    if t.rc != 0:
        result["error"] = (t.stderr or t.stdout)[-2000:]
        ctx.log(f"    ! parsl-chat exited {t.rc}: {(t.stderr or t.stdout)[-600:]}")
    if t.rc == 2:  # refused before sending anything: whatever is in `out` is not this run's
        return result
    result.update(run_dir_stats(out, t.t0))
    result.update(phase_peaks(t.samples, result.get("first_request_s"), result.get("last_result_s")))
    if not ctx.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return result


def run_dir_name(rnd: int, index: int, label: str) -> str:
    """A run directory's name for the ``index``-th run of variant ``label`` in round ``rnd`` (unique per variant)."""
    return f"run-{rnd}-{index}-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def phase_peaks(samples: list[tuple[float, float]], first: float | None, last: float | None) -> dict[str, Any]:
    """Driver RSS peaks before the first request, while requests run, and after the last answer."""
    if not samples or first is None or last is None:
        return {}

    def peak(lo: float, hi: float) -> float | None:
        vals = [mb for t, mb in samples if lo <= t < hi]
        return max(vals) if vals else None

    return {
        "rss_mb_startup_peak": peak(0, first),
        "rss_mb_dispatch_peak": peak(first, last),
        "rss_mb_end_peak": peak(last, float("inf")),
    }


def run_dir_stats(run_dir: Path, t0: float) -> dict[str, Any]:
    """Counts and timings from a run directory, relative to the process start ``t0``."""
    stats: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        stats["summary_wall_s"] = summary.get("wall_s")
        stats["summary_parallel_efficiency"] = summary.get("parallel_efficiency")
        stats["summary_prompts_per_s"] = (summary.get("throughput") or {}).get("prompts_per_s")
        stats["summary_completion_tokens_per_s"] = (summary.get("throughput") or {}).get("completion_tokens_per_s")
    parquet = run_dir / "results.parquet"
    if not parquet.exists():
        return stats
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = ["agent", "status", "started_at", "finished_at", "latency_s", "completion_tokens", "node", "worker"]
    table = pq.read_table(parquet, columns=cols)
    n = table.num_rows
    stats["rows"] = n
    stats["ok"] = int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
    if n:
        epoch = lambda col: pc.cast(table[col], "int64").to_numpy(zero_copy_only=False) / 1e6  # noqa: E731
        started, finished = epoch("started_at"), epoch("finished_at")
        stats["first_result_s"] = round(float(finished.min()) - t0, 3)
        stats["first_request_s"] = round(float(started.min()) - t0, 3)
        stats["last_result_s"] = round(float(finished.max()) - t0, 3)
        stats["request_span_s"] = round(float(finished.max() - started.min()), 3)
        stats["mean_latency_ms"] = round(float(pc.mean(table["latency_s"]).as_py() or 0) * 1000, 2)
        stats["completion_tokens"] = int(pc.sum(table["completion_tokens"]).as_py() or 0)
        stats["per_agent"] = {str(k): int(v) for k, v in _value_counts(table["agent"]).items()}
        stats["per_node"] = {str(k): int(v) for k, v in _value_counts(table["node"]).items()}
        stats["workers_seen"] = len(_value_counts(table["worker"]))
    return stats


def _value_counts(column: Any) -> dict[Any, int]:
    counts = column.value_counts()
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


def run_script(script: str, *args: str, timeout_s: float = 1800) -> dict[str, Any]:
    """Time a baseline script in benchmarks/ that prints one JSON object."""
    t = timed([sys.executable, str(BENCH_DIR / script), *args], timeout_s=timeout_s)
    result: dict[str, Any] = t.brief()
    try:
        result.update(json.loads(t.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        result["error"] = (t.stderr or t.stdout)[-2000:]
    if t.rc != 0 and "error" not in result:
        result["error"] = t.stderr[-2000:]
    if result.get("first_result_s") is not None:
        result["first_result_s"] = round(result["first_result_s"], 3)
    if result.get("startup_s") is not None and result.get("loop_s") is not None:
        # measured from the script's first line (the interpreter's own start-up, ~50 ms, is not in these)
        result["first_request_s"] = round(result["startup_s"], 3)
        result["last_result_s"] = round(result["startup_s"] + result["loop_s"], 3)
        result["request_span_s"] = round(result["loop_s"], 3)
    return result


# --------------------------------------------------------------------------- figures


def ideal_makespan(n: int, concurrency: int, latency_s: float) -> float:
    return math.ceil(n / concurrency) * latency_s


def med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_range(values: Sequence[float | None], digits: int = 3) -> str:
    lo, hi = spread(values)
    if lo is None or hi is None:
        return "-"
    if len([v for v in values if v is not None]) < 2:
        return fmt(lo, digits)
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(ctx: Context, name: str, data: dict[str, Any], markdown: str) -> None:
    """``results/<name>.json`` and ``results/<name>.md``."""
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "mode": "quick" if ctx.quick else "full", "machine": machine_info(), **data}
    (ctx.results_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (ctx.results_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    ctx.log(f"  wrote {ctx.results_dir / name}.json and .md")


def interleaved(variants: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """Run order: every variant once per round, rotated, so load drifts hit all of them alike."""
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        shift = r % len(variants)
        order += [(r, v) for v in list(variants[shift:]) + list(variants[:shift])]
    return order
