#!/usr/bin/env python3
"""A/B: two trees of parsl-chat side by side: proposals applied, or two git revisions.

    python benchmarks/ab_trees.py --base 2 --with 3 --repeats 2      # proposals 1..2 vs 1..3
    python benchmarks/ab_trees.py --rev-a 72b4495 --rev-b HEAD        # two commits (a redesign's before/after)

Builds two copies of parsl_chat/ (patched with proposals 1..base and 1..with, in
file name order, or checked out at two revisions with ``git archive``), then runs
the fan-out case (5,000 prompts, 100 ms, C = 12, Parsl) and the slow-agent
routing case (least_loaded) with each, interleaved. Writes
``<results>/ab-<a>-vs-<b>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    DEFAULT_RESULTS,
    REPO,
    Context,
    agents_config,
    clean_env,
    fmt,
    fmt_range,
    ideal_makespan,
    interleaved,
    md_table,
    med,
    run_parsl_chat,
    simulated,
    write_prompts,
    write_result,
)


def _tree(work: Path, count: int) -> Path:
    tree = work / f"tree-{count}"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    shutil.copytree(REPO / "parsl_chat", tree / "parsl_chat", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", tree / "configs")
    for diff in sorted((BENCH_DIR / "proposals").glob("*.diff"))[:count]:
        subprocess.run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-d", str(tree), "-i", str(diff)], check=True)
    return tree


def _rev_tree(work: Path, rev: str) -> Path:
    """parsl_chat/ and configs/ as they were at git revision ``rev``."""
    tree = work / f"rev-{rev}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "parsl_chat", "configs"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, default=2)
    p.add_argument("--with", dest="with_", type=int, default=3)
    p.add_argument("--rev-a", help="a git revision: compare two commits instead of proposals")
    p.add_argument("--rev-b", help="the other git revision (with --rev-a)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="parsl-chat-ab-"))
    ctx = Context(quick=False, results_dir=args.results, work_dir=work, repeats=args.repeats)
    if args.rev_a or args.rev_b:
        if not (args.rev_a and args.rev_b):
            p.error("--rev-a and --rev-b go together")
        trees = {f"rev {args.rev_a}": _rev_tree(work, args.rev_a), f"rev {args.rev_b}": _rev_tree(work, args.rev_b)}
        name = f"ab-{args.rev_a}-vs-{args.rev_b}"
    else:
        trees = {f"proposals 1..{args.base}": _tree(work, args.base), f"proposals 1..{args.with_}": _tree(work, args.with_)}
        name = f"ab-{args.base}-vs-{args.with_}"
    prompts = write_prompts(work / "prompts.jsonl", args.n)
    routing_prompts = write_prompts(work / "routing.jsonl", 900)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"fanout": {}, "routing": {}}
    with contextlib.ExitStack() as stack:
        fast = stack.enter_context(simulated(100))
        slow = stack.enter_context(simulated(500))
        fanout_cfg = agents_config(work / "fanout.yaml", agents=3, concurrency=4)
        routing_cfg = agents_config(
            work / "routing.yaml", concurrency=4, routing="least_loaded", endpoints=[fast.url, fast.url, slow.url]
        )
        for rnd, label in interleaved(list(trees), args.repeats):
            env = clean_env({"PYTHONPATH": str(trees[label])})
            ctx.log(f"  round {rnd + 1}: {label}: fan-out")
            r = run_parsl_chat(ctx, prompts, work / f"f-{rnd}-{len(runs['fanout'].get(label, []))}",
                               "--config", str(fanout_cfg), "--endpoint", fast.url, "--model", "sim", env=env)  # fmt: skip
            r["efficiency"] = ideal_makespan(args.n, 12, 0.1) / r["wall_s"]
            runs["fanout"].setdefault(label, []).append(r)
            ctx.log(f"    wall {r['wall_s']:.2f} s, efficiency {r['efficiency']:.3f}")
            ctx.log(f"  round {rnd + 1}: {label}: routing least_loaded")
            r = run_parsl_chat(ctx, routing_prompts, work / f"r-{rnd}-{len(runs['routing'].get(label, []))}",
                               "--config", str(routing_cfg), env=env)  # fmt: skip
            r["slow_agent_share"] = r.get("per_agent", {}).get("a3", 0) / 900
            runs["routing"].setdefault(label, []).append(r)
            ctx.log(f"    wall {r['wall_s']:.2f} s, per agent {r.get('per_agent')}")
    rows = []
    for label in trees:
        fan, rout = runs["fanout"][label], runs["routing"][label]
        rows.append(
            [
                label,
                fmt(med([x["wall_s"] for x in fan]), 2),
                fmt_range([x["efficiency"] for x in fan]),
                fmt(med([x.get("request_span_s") for x in fan]), 2),
                fmt(med([x["wall_s"] for x in rout]), 2),
                fmt(med([x.get("request_span_s") for x in rout]), 2),
                f"{med([x['slow_agent_share'] for x in rout]):.1%}",
            ]
        )
    md = [
        f"## A/B: {' vs '.join(trees)}",
        "",
        f"Fan-out: {args.n} prompts, 100 ms, C = 12, Parsl (ideal {ideal_makespan(args.n, 12, 0.1):.1f} s). "
        "Routing: 900 prompts, least_loaded, agents at 100/100/500 ms, 4 in flight each (speed-proportional "
        "share of the slow agent: 9.1%, ideal request span 10.2 s).",
        "",
        md_table(
            [
                "tree",
                "fan-out wall s",
                "fan-out efficiency (runs)",
                "fan-out request span s",
                "routing wall s",
                "routing request span s",
                "slow agent share",
            ],
            rows,
        ),
    ]
    write_result(ctx, name, {"runs": runs, "n": args.n}, "\n".join(md))
    with contextlib.suppress(OSError):
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
