"""1. Fan-out efficiency (and 2. beyond one event loop): parsl-chat against a bare asyncio loop.

Same simulated server, same prompts, same total concurrency C, every variant
run in turn within one round and the rounds repeated, so the machine's load
hits all of them alike. Efficiency = ideal makespan (ceil(N/C) x latency) /
wall time of the whole process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    Context,
    agents_config,
    fmt,
    fmt_range,
    ideal_makespan,
    interleaved,
    loadavg,
    md_table,
    med,
    proposed_env,
    run_dir_name,
    run_parsl_chat,
    run_script,
    simulated,
    write_prompts,
    write_result,
)

Variant = Callable[[Path], dict[str, Any]]
PROPOSED_PARSL = "parsl-chat + proposals (Parsl HTEX)"
PROPOSED_NO_PARSL = "parsl-chat + proposals --no-parsl"


def _variants(ctx: Context, work: Path, prompts: Path, url: str, concurrency: int, naive: bool) -> dict[str, Variant]:
    """Each variant runs once per call and returns the timed figures."""
    agents = 3
    per_agent = concurrency // agents
    config = agents_config(work / "agents.yaml", agents=agents, concurrency=per_agent)
    common = ("--config", str(config), "--endpoint", url, "--model", "sim")
    system = ("--system", "Be brief.")

    def parsl(out: Path) -> dict[str, Any]:
        return run_parsl_chat(ctx, prompts, out, *common)

    def no_parsl(out: Path) -> dict[str, Any]:
        return run_parsl_chat(ctx, prompts, out, *common, "--no-parsl")

    def bare(client: str) -> Variant:
        def go(out: Path) -> dict[str, Any]:
            return run_script(
                "bare_loop.py", str(prompts), url, "--concurrency", str(concurrency), "--client", client, *system,
                "--out", str(out) + ".jsonl",
            )  # fmt: skip

        return go

    def naive_parsl(out: Path) -> dict[str, Any]:
        return run_script(
            "naive_parsl.py", str(prompts), url, "--concurrency", str(concurrency), *system, "--out", str(out) + ".jsonl"
        )

    variants: dict[str, Variant] = {
        "parsl-chat (Parsl HTEX)": parsl,
        "parsl-chat --no-parsl": no_parsl,
        "bare loop, openai client": bare("openai"),
        "bare loop, aiohttp (floor)": bare("aiohttp"),
    }
    if naive:
        variants["naive: one Parsl app per prompt"] = naive_parsl
    env = proposed_env(ctx)
    if env is not None:
        variants[PROPOSED_PARSL] = lambda out: run_parsl_chat(ctx, prompts, out, *common, env=env)
        variants[PROPOSED_NO_PARSL] = lambda out: run_parsl_chat(ctx, prompts, out, *common, "--no-parsl", env=env)
    return variants


def measure(ctx: Context, name: str, *, n: int, concurrency: int, latency_ms: float, repeats: int, naive: bool) -> dict[str, Any]:
    """Run every variant ``repeats`` times, interleaved; per-variant runs and medians."""
    work = ctx.scratch(name)
    prompts = write_prompts(work / "prompts.jsonl", n)
    ideal = ideal_makespan(n, concurrency, latency_ms / 1000) if latency_ms else None
    runs: dict[str, list[dict[str, Any]]] = {}
    with simulated(latency_ms) as server:
        variants = _variants(ctx, work, prompts, server.url, concurrency, naive)
        for rnd, label in interleaved(list(variants), repeats):
            ctx.log(f"  [{name}] round {rnd + 1}/{repeats}: {label} (N={n}, C={concurrency}, latency {latency_ms:g} ms)")
            load = loadavg()
            result = variants[label](work / run_dir_name(rnd, len(runs.get(label, [])), label))
            result["round"] = rnd
            result["loadavg_before"] = load
            result["prompts_per_s"] = n / result["wall_s"] if result.get("wall_s") else None
            if ideal:
                result["efficiency"] = ideal / result["wall_s"] if result.get("wall_s") else None
            runs.setdefault(label, []).append(result)
            eff = f", efficiency {result['efficiency']:.3f}" if ideal and result.get("efficiency") else ""
            ctx.log(f"    wall {result['wall_s']:.2f} s, {result['prompts_per_s']:.1f} prompts/s{eff}")
    summary = {}
    reference = "bare loop, openai client"
    ref_rounds = {r["round"]: r for r in runs.get(reference, [])}
    for label, rs in runs.items():
        ratios = [(ref_rounds[r["round"]]["wall_s"] / r["wall_s"]) for r in rs if r["round"] in ref_rounds and r.get("wall_s")]
        summary[label] = {
            "wall_s": med([r.get("wall_s") for r in rs]),
            "efficiency": med([r.get("efficiency") for r in rs]) if ideal else None,
            "efficiency_runs": [r.get("efficiency") for r in rs] if ideal else None,
            "prompts_per_s": med([r.get("prompts_per_s") for r in rs]),
            "prompts_per_s_runs": [r.get("prompts_per_s") for r in rs],
            "throughput_vs_bare_openai": med(ratios),
            "throughput_vs_bare_openai_runs": ratios,
            "first_result_s": med([r.get("first_result_s") for r in rs]),
            "mean_latency_ms": med([r.get("mean_latency_ms") or _ms(r.get("mean_latency_s")) for r in rs]),
            "tail_s": med([(r["wall_s"] - r["last_result_s"]) for r in rs if r.get("last_result_s")]),
            "first_request_s": med([r.get("first_request_s") for r in rs]),
            "request_span_s": med([r.get("request_span_s") for r in rs]),
            "maxrss_mb": med([r.get("maxrss_mb") for r in rs]),
            "tree_peak_rss_mb": med([r.get("tree_peak_rss_mb") for r in rs]),
            "failed_runs": sum(1 for r in rs if r.get("rc") not in (0, None) or r.get("error")),
        }
    return {
        "n": n,
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "ideal_makespan_s": ideal,
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def table(data: dict[str, Any], with_efficiency: bool = True) -> str:
    headers = ["variant", "wall s (median)"]
    if with_efficiency:
        headers += ["efficiency (median)", "efficiency (all runs)"]
    headers += ["prompts/s", "throughput vs bare openai", "first result s", "mean latency ms", "start-up s", "end s"]
    rows = []
    for label, s in data["summary"].items():
        row: list[Any] = [label, fmt(s["wall_s"], 2)]
        if with_efficiency:
            row += [fmt(s["efficiency"]), fmt_range(s["efficiency_runs"])]
        row += [
            fmt(s["prompts_per_s"], 1),
            f"{fmt(s['throughput_vs_bare_openai'], 2)} ({fmt_range(s['throughput_vs_bare_openai_runs'], 2)})",
            fmt(s["first_result_s"], 2),
            fmt(s["mean_latency_ms"], 1),
            fmt(s["first_request_s"], 2),
            fmt(s["tail_s"], 2),
        ]
        rows.append(row)
    return md_table(headers, rows)


def run(ctx: Context) -> dict[str, Any]:
    """Benchmark 1: N prompts, 100 ms, C = 12 (3 agents x 4)."""
    n = 600 if ctx.quick else 5000
    data = measure(ctx, "fanout", n=n, concurrency=12, latency_ms=100, repeats=ctx.repeats, naive=True)
    md = [
        "## 1. Fan-out efficiency",
        "",
        f"{n} prompts, simulated endpoint with a fixed 100 ms latency, total concurrency C = 12 "
        f"(3 agents x 4), ideal makespan ceil(N/C) x 100 ms = {data['ideal_makespan_s']:.1f} s; "
        f"wall = the whole process; {data['repeats']} interleaved round(s). "
        "'start-up s' = process start to first request sent, 'end s' = last answer to process exit "
        "(parsl-chat: results.parquet/csv, output.jsonl, summary.json).",
        "",
        table(data),
    ]
    write_result(ctx, "fanout", data, "\n".join(md))
    return data


def run_beyond(ctx: Context) -> dict[str, Any]:
    """Benchmark 2: C = 48 at 100 ms (and at a short latency), and zero latency: prompts/s."""
    parts: dict[str, Any] = {}
    n48 = 2400 if ctx.quick else 9600
    parts["c48_100ms"] = measure(ctx, "beyond-c48", n=n48, concurrency=48, latency_ms=100, repeats=ctx.repeats, naive=False)
    n0 = 3000 if ctx.quick else 10_000
    parts["c48_10ms"] = measure(ctx, "beyond-c48-10ms", n=n0, concurrency=48, latency_ms=10, repeats=ctx.repeats, naive=False)
    parts["c48_0ms"] = measure(ctx, "beyond-c48-0ms", n=n0, concurrency=48, latency_ms=0, repeats=ctx.repeats, naive=False)
    md = [
        "## 2. Beyond one event loop (C = 48)",
        "",
        f"### 100 ms latency, {n48} prompts (ideal {parts['c48_100ms']['ideal_makespan_s']:.1f} s)",
        "",
        table(parts["c48_100ms"]),
        "",
        f"### 10 ms latency, {n0} prompts (ideal {parts['c48_10ms']['ideal_makespan_s']:.1f} s)",
        "",
        table(parts["c48_10ms"]),
        "",
        f"### zero latency, {n0} prompts: the whole pipeline's prompts/s",
        "",
        table(parts["c48_0ms"], with_efficiency=False),
    ]
    data = {"parts": parts}
    write_result(ctx, "beyond", data, "\n".join(md))
    return data


__all__ = ["measure", "run", "run_beyond", "table"]
_ = fmt  # re-exported for other suites
