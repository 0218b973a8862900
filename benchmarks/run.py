#!/usr/bin/env python3
"""parsl-chat benchmarks: fan-out efficiency, scaling past one loop, memory, real model, SLURM, routing, cache,
engines.

    python benchmarks/run.py                 # full mode (about an hour on 2 cores)
    python benchmarks/run.py --quick         # a few minutes: proves the scripts work (CI)
    python benchmarks/run.py --only fanout,routing --repeats 3

Each benchmark writes ``<results>/<name>.json`` (every run's figures, medians,
the machine) and ``<results>/<name>.md`` (its table); ``summary.md`` gathers
the tables. Load tests talk only to servers started here on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_RESULTS, Context, build_proposed_tree, machine_info

SUITES = ("fanout", "beyond", "memory", "model", "slurm", "routing", "cache", "engines")


def _suite(name: str) -> Callable[[Context], dict[str, Any]]:
    if name == "fanout":
        from fanout import run

        return run
    if name == "beyond":
        from fanout import run_beyond

        return run_beyond
    if name == "memory":
        from memory import run as run_memory

        return run_memory
    if name == "model":
        from model import run as run_model

        return run_model
    if name == "slurm":
        from slurm import run as run_slurm

        return run_slurm
    if name == "cache":
        from cache import run as run_cache

        return run_cache
    if name == "engines":
        from engines import run as run_engines

        return run_engines
    from routing import run as run_routing

    return run_routing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round: minutes, not an hour")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(SUITES)}")
    p.add_argument("--repeats", type=int, help="interleaved rounds per comparison (default: 1 quick, 3 full)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"output folder (default {DEFAULT_RESULTS})")
    p.add_argument("--work", type=Path, help="scratch folder for prompts files and run directories (default: a temp dir)")
    p.add_argument("--keep-runs", action="store_true", help="keep parsl-chat run directories in the scratch folder")
    p.add_argument(
        "--proposals",
        action="store_true",
        help="also measure parsl-chat with benchmarks/proposals/*.diff applied (a patched copy; the tree is not touched)",
    )
    p.add_argument(
        "--slurm-sizes",
        help="comma-separated prompt counts for the SLURM comparison (default 7200,14400; quick 1200): "
        "a node's share of work sets how much the fixed start-up weighs",
    )
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SUITES)
    unknown = [s for s in only if s not in SUITES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    try:
        slurm_sizes = tuple(int(n) for n in args.slurm_sizes.split(",")) if args.slurm_sizes else None
    except ValueError:
        p.error(f"--slurm-sizes: expected comma-separated prompt counts, got {args.slurm_sizes!r}")
    own_work = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="parsl-chat-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        quick=args.quick,
        results_dir=args.results,
        work_dir=work,
        repeats=args.repeats or (1 if args.quick else 3),
        keep_runs=args.keep_runs,
        slurm_sizes=slurm_sizes,
        log=lambda line: print(line, flush=True),
    )
    ctx.results_dir.mkdir(parents=True, exist_ok=True)
    if args.proposals:
        ctx.proposed = build_proposed_tree(work, ctx.log)
    print(f"parsl-chat benchmarks ({'quick' if args.quick else 'full'}): {', '.join(only)}; results in {ctx.results_dir}")
    print(f"machine: {json.dumps(machine_info())}", flush=True)
    status: dict[str, Any] = {}
    for name in only:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            _suite(name)(ctx)
            status[name] = {"status": "ok"}
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            status[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        status[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"== {name}: {status[name]['status']} in {status[name]['seconds']} s", flush=True)
    tables = [
        (ctx.results_dir / f"{name}.md").read_text()
        for name in SUITES
        if name in only and (ctx.results_dir / f"{name}.md").exists()
    ]
    (ctx.results_dir / "summary.md").write_text("\n\n".join(tables))
    (ctx.results_dir / "status.json").write_text(
        json.dumps({"mode": "quick" if args.quick else "full", **status}, indent=2) + "\n"
    )
    if own_work and not args.keep_runs:
        shutil.rmtree(work, ignore_errors=True)  # prompts files of up to a million lines
    failed = [n for n, s in status.items() if s["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
