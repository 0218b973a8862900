"""5. SLURM scaling: one block of 1 node against one block of 2 nodes of the dev cluster.

Per-node concurrency cap: each node runs 2 worker processes with 2 slots per
agent (3 agents), i.e. 12 requests in flight per node, so the total
concurrency is 12 on one node and 24 on two. Simulated endpoint, 100 ms.
Speedup = wall(1 node) / wall(2 nodes), both whole ``parsl-chat run``
processes from a login-node-like driver (``--profile`` a slurm profile:
sbatch, wait for the job, workers connect back). Time to first result =
process start to the first answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from common import (
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
    proposed_env,
    run_parsl_chat,
    simulated,
    write_prompts,
    write_result,
    write_yaml,
)

LATENCY_MS = 100
PER_NODE = 12  # requests in flight per node: 2 workers x 3 agents x 2 slots
WORKERS = 2


def _slurm_env() -> dict[str, str] | None:
    script = REPO / "scripts" / "slurm-dev-cluster"
    if shutil.which("sbatch") is None or not script.exists():
        return None
    conf = os.environ.get("SLURM_CONF") or "/tmp/parsl-chat-slurm/slurm.conf"
    env = clean_env({"SLURM_CONF": conf} if Path(conf).exists() else {})
    status = subprocess.run([str(script), "status"], capture_output=True, text=True, env=env, timeout=60)
    return env if status.returncode == 0 else None


def _queue(env: dict[str, str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env, timeout=30).stdout
    return out.split()


def _wait_idle(env: dict[str, str], timeout_s: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (jobs := _queue(env)) and time.monotonic() < deadline:
        time.sleep(1)
    return jobs


def run(ctx: Context) -> dict[str, Any]:
    env = _slurm_env()
    if env is None:
        data: dict[str, Any] = {"skipped": "the dev SLURM cluster is not up (scripts/slurm-dev-cluster start)"}
        write_result(ctx, "slurm", data, "## 5. SLURM scaling\n\nskipped: " + data["skipped"])
        return data
    # Two sizes in full mode: the fixed cost per run (~5 s: job start, workers connecting, end)
    # weighs less on the longer one, which shows what the request phase scales to.
    sizes = list(ctx.slurm_sizes or ((1200,) if ctx.quick else (7200, 14400)))
    results = {n: _measure(ctx, env, n) for n in sizes}
    data = {"sizes": {str(n): d for n, (d, _) in results.items()}}
    write_result(ctx, "slurm", data, "\n\n".join("\n".join(md) for _, md in results.values()))
    return data


def _measure(ctx: Context, env: dict[str, str], n: int) -> tuple[dict[str, Any], list[str]]:
    work = ctx.scratch(f"slurm-{n}")
    prompts = write_prompts(work / "prompts.jsonl", n)
    runs: dict[str, list[dict[str, Any]]] = {}
    with simulated(LATENCY_MS) as server:
        setups = {}
        for nodes in (1, 2):
            profile = write_yaml(
                work / f"slurm-{nodes}node.yaml",
                {
                    "description": f"benchmark: one block of {nodes} node(s)",
                    "executor": "slurm",
                    "partition": "debug",
                    "nodes_per_block": nodes,
                    "init_blocks": 1,
                    "min_blocks": 0,
                    "max_blocks": 1,
                    "workers": WORKERS,
                    "walltime": "00:30:00",
                    "status_polling_s": 2,
                    "strategy": "simple",
                },
            )
            config = agents_config(work / f"agents-{nodes}.yaml", agents=3, concurrency=PER_NODE * nodes // 3)
            setups[nodes] = ("--profile", str(profile), "--config", str(config), "--endpoint", server.url, "--model", "sim")
        keys: list[Any] = ["1", "2"]
        penv = proposed_env(ctx)
        if penv is not None:
            penv = {**env, "PYTHONPATH": penv["PYTHONPATH"]}
            keys += ["1+proposals", "2+proposals"]
        for rnd, key in interleaved(keys, ctx.repeats):
            nodes = int(str(key)[0])
            leftover = _wait_idle(env)
            if leftover:
                ctx.log(f"    ! jobs still queued before the run: {leftover}")
            ctx.log(f"  [slurm] round {rnd + 1}/{ctx.repeats}: {key} node(s), C={PER_NODE * nodes}, N={n}")
            run_env = penv if "proposals" in str(key) else env
            out = work / f"run-{str(key).replace('+', '-')}-{rnd}"
            result = run_parsl_chat(ctx, prompts, out, *setups[nodes], env=run_env)
            result.update(round=rnd, nodes=nodes, key=str(key), concurrency=PER_NODE * nodes)
            result["ideal_makespan_s"] = ideal_makespan(n, PER_NODE * nodes, LATENCY_MS / 1000)
            result["efficiency"] = result["ideal_makespan_s"] / result["wall_s"] if result.get("wall_s") else None
            if result.get("request_span_s"):
                result["span_efficiency"] = result["ideal_makespan_s"] / result["request_span_s"]
            result["jobs_left_after"] = _wait_idle(env, 60)
            ctx.log(
                f"    wall {result['wall_s']:.1f} s, first result {result.get('first_result_s')} s, "
                f"nodes {result.get('per_node')}, efficiency {fmt(result['efficiency'])}"
            )
            runs.setdefault(str(key), []).append(result)
    summary: dict[str, dict[str, Any]] = {}
    for key in [str(k) for k in keys if str(k) in runs]:
        rs = runs[key]
        summary[key] = {
            "nodes": rs[0]["nodes"],
            "wall_s": med([r["wall_s"] for r in rs]),
            "wall_s_runs": [r["wall_s"] for r in rs],
            "efficiency": med([r.get("efficiency") for r in rs]),
            "span_efficiency": med([r.get("span_efficiency") for r in rs]),
            "first_result_s": med([r.get("first_result_s") for r in rs]),
            "first_result_s_runs": [r.get("first_result_s") for r in rs],
            "request_span_s": med([r.get("request_span_s") for r in rs]),
            "tail_s": med([r["wall_s"] - r["last_result_s"] for r in rs if r.get("last_result_s")]),
            "per_node": rs[0].get("per_node"),
            "ideal_makespan_s": rs[0]["ideal_makespan_s"],
        }
    by_round = {(r["round"], r["key"]): r for rs in runs.values() for r in rs}

    def speedups_of(one: str, two: str, field: str) -> list[float]:
        return [
            by_round[(rnd, one)][field] / by_round[(rnd, two)][field]
            for rnd in range(ctx.repeats)
            if by_round.get((rnd, one), {}).get(field) and by_round.get((rnd, two), {}).get(field)
        ]

    speedups = speedups_of("1", "2", "wall_s")
    span_speedups = speedups_of("1", "2", "request_span_s")
    proposal_speedups = speedups_of("1+proposals", "2+proposals", "wall_s")
    data = {
        "n": n,
        "latency_ms": LATENCY_MS,
        "per_node_concurrency": PER_NODE,
        "workers_per_node": WORKERS,
        "speedup": med(speedups),
        "speedup_runs": speedups,
        "span_speedup": med(span_speedups),
        "speedup_with_proposals": med(proposal_speedups),
        "summary": summary,
        "runs": runs,
    }
    rows = [
        [
            key,
            str(PER_NODE * s["nodes"]),
            fmt(s["ideal_makespan_s"], 1),
            fmt(s["wall_s"], 2),
            fmt_range(s["wall_s_runs"], 1),
            fmt(s["efficiency"]),
            fmt(s["request_span_s"], 2),
            fmt(s["span_efficiency"]),
            fmt(s["first_result_s"], 2),
            fmt(s["tail_s"], 2),
            ", ".join(f"{k}: {v}" for k, v in sorted((s["per_node"] or {}).items())),
        ]
        for key, s in summary.items()
    ]
    md = [
        f"## 5. SLURM scaling (dev cluster, 2 nodes on this machine): {n} prompts",
        "",
        f"{n} prompts, simulated endpoint {LATENCY_MS} ms, per-node cap {PER_NODE} in flight "
        f"({WORKERS} workers x 3 agents x 2 slots); `--profile` slurm-style profile, one block of 1 or 2 nodes, "
        "status polling 2 s. Wall = the whole driver process (sbatch, job start, workers connecting, results).",
        "",
        md_table(
            [
                "nodes",
                "C",
                "ideal s",
                "wall s",
                "wall s (runs)",
                "efficiency",
                "request span s",
                "span efficiency",
                "first result s",
                "end s",
                "prompts per node",
            ],
            rows,
        ),
        "",
        f"Speedup 2 nodes vs 1: **{fmt(data['speedup'], 2)}x** (runs: {fmt_range(speedups, 2)}); "
        f"request phase alone: {fmt(data['span_speedup'], 2)}x"
        + (f"; with the proposals: {fmt(data['speedup_with_proposals'], 2)}x" if proposal_speedups else "")
        + ".",
    ]
    return data, md
