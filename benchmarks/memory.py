"""3. Memory: the driver's peak RSS for a small and a 10x larger prompts file.

Zero-latency simulated server, 3 agents x 16, generated prompts. The peak is
the kernel's high-water mark of the driver process (``VmHWM``, the ``parsl-chat
run`` process itself, not its Parsl workers); the driver's RSS is also sampled
every 50 ms to say *when* the peak happens: before the first request, while
requests run, or after the last answer (writing results.parquet/csv,
output.jsonl and summary.json).
"""

from __future__ import annotations

from typing import Any

from common import Context, agents_config, fmt, md_table, proposed_env, run_parsl_chat, simulated, write_prompts, write_result

LIMIT_MB = 300
FLAT_RATIO = 1.5


def run(ctx: Context) -> dict[str, Any]:
    small, large = (5_000, 50_000) if ctx.quick else (100_000, 1_000_000)
    work = ctx.scratch("memory")
    config = agents_config(work / "agents.yaml", agents=3, concurrency=16)
    cases = [(small, "parsl"), (large, "parsl")]
    if ctx.proposed is not None:
        cases += [(small, "parsl + proposals"), (large, "parsl + proposals")]
    runs: list[dict[str, Any]] = []
    with simulated(0) as server:
        for n, mode in cases:
            prompts = work / f"prompts-{n}.jsonl"
            if not prompts.exists():
                write_prompts(prompts, n)
            args = ["--config", str(config), "--endpoint", server.url, "--model", "sim"]
            env = proposed_env(ctx) if "proposals" in mode else None
            ctx.log(f"  [memory] {n} prompts, {mode}")
            out = work / f"run-{n}-{mode.replace(' ', '').replace('+', '-')}"
            result = run_parsl_chat(ctx, prompts, out, *args, env=env, timeout_s=4 * 3600)
            result.update(n=n, mode=mode, prompts_file_mb=round(prompts.stat().st_size / 2**20, 1))
            result["prompts_per_s"] = n / result["wall_s"] if result.get("wall_s") else None
            ctx.log(
                f"    wall {result['wall_s']:.1f} s, driver peak {result['driver_peak_rss_mb']} MB "
                f"(start {result.get('rss_mb_startup_peak')}, dispatch {result.get('rss_mb_dispatch_peak')}, "
                f"end {result.get('rss_mb_end_peak')})"
            )
            runs.append(result)
    by = {(r["n"], r["mode"]): r for r in runs}
    p_small, p_large = by[(small, "parsl")], by[(large, "parsl")]
    ratio = (
        p_large["driver_peak_rss_mb"] / p_small["driver_peak_rss_mb"]
        if p_large.get("driver_peak_rss_mb") and p_small.get("driver_peak_rss_mb")
        else None
    )
    dispatch_ratio = (
        p_large["rss_mb_dispatch_peak"] / p_small["rss_mb_dispatch_peak"]
        if p_large.get("rss_mb_dispatch_peak") and p_small.get("rss_mb_dispatch_peak")
        else None
    )
    proposals_ratio = None
    if (small, "parsl + proposals") in by and (large, "parsl + proposals") in by:
        a, b = by[(small, "parsl + proposals")], by[(large, "parsl + proposals")]
        if a.get("driver_peak_rss_mb") and b.get("driver_peak_rss_mb"):
            proposals_ratio = b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"]
    data = {
        "sizes": [small, large],
        "peak_ratio_with_proposals": proposals_ratio,
        "limit_mb": LIMIT_MB,
        "flat_ratio_limit": FLAT_RATIO,
        "peak_ratio_large_vs_small": ratio,
        "dispatch_peak_ratio_large_vs_small": dispatch_ratio,
        "runs": runs,
    }
    rows = [
        [
            f"{r['n']:,}",
            r["mode"],
            fmt(r.get("driver_peak_rss_mb"), 1),
            fmt(r.get("rss_mb_startup_peak"), 1),
            fmt(r.get("rss_mb_dispatch_peak"), 1),
            fmt(r.get("rss_mb_end_peak"), 1),
            fmt(r.get("tree_peak_rss_mb"), 1),
            fmt(r.get("wall_s"), 1),
            fmt(r.get("prompts_per_s"), 0),
            f"{r.get('ok', 0):,}/{r['n']:,}",
        ]
        for r in runs
    ]
    md = [
        "## 3. Memory",
        "",
        "Driver peak RSS (`VmHWM` of the `parsl-chat run` process) against the zero-latency simulated server, "
        f"3 agents x 16. Target: under {LIMIT_MB} MB, and the {large:,}-prompt peak "
        f"at most {FLAT_RATIO}x the {small:,}-prompt one. "
        "'start'/'dispatch'/'end' = peak of the sampled RSS before the first request / while requests run / "
        "after the last answer (results files and summary.json). 'tree' = driver + interchange + workers.",
        "",
        md_table(
            ["prompts", "backend", "driver peak MB", "start MB", "dispatch MB", "end MB", "tree MB", "wall s", "prompts/s", "ok"],
            rows,
        ),
        "",
        f"Peak ratio {large:,} / {small:,} (Parsl): **{fmt(ratio, 2)}** (dispatch phase only: {fmt(dispatch_ratio, 2)}"
        + (f"; with the proposals: {fmt(proposals_ratio, 2)}" if proposals_ratio else "")
        + ").",
    ]
    write_result(ctx, "memory", data, "\n".join(md))
    return data
