"""6. Routing: round_robin against least_loaded when one agent of three is 5x slower.

Three simulated servers (100, 100 and 500 ms), one agent per server through a
config with explicit endpoints, 4 requests in flight per agent, Parsl on this
machine. round_robin gives every agent a third of the prompts, so the slow one
sets the makespan; least_loaded lets free slots take the next prompt.
"""

from __future__ import annotations

import contextlib
from typing import Any

from common import (
    Context,
    agents_config,
    fmt,
    fmt_range,
    interleaved,
    md_table,
    med,
    run_parsl_chat,
    simulated,
    write_prompts,
    write_result,
)

LATENCIES_MS = (100, 100, 500)
CONCURRENCY = 4


def run(ctx: Context) -> dict[str, Any]:
    n = 240 if ctx.quick else 900
    work = ctx.scratch("routing")
    prompts = write_prompts(work / "prompts.jsonl", n)
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(simulated(ms)) for ms in LATENCIES_MS]
        endpoints = [s.url for s in servers]
        configs = {
            policy: agents_config(work / f"{policy}.yaml", concurrency=CONCURRENCY, routing=policy, endpoints=endpoints)
            for policy in ("round_robin", "least_loaded")
        }
        for rnd, policy in interleaved(list(configs), ctx.repeats):
            ctx.log(f"  [routing] round {rnd + 1}/{ctx.repeats}: {policy} (N={n})")
            result = run_parsl_chat(ctx, prompts, work / f"run-{policy}-{rnd}", "--config", str(configs[policy]))
            result["round"] = rnd
            slow = result.get("per_agent", {}).get("a3", 0)
            result["slow_agent_prompts"] = slow
            result["slow_agent_share"] = slow / n
            ctx.log(f"    wall {result['wall_s']:.1f} s, per agent {result.get('per_agent')}")
            runs.setdefault(policy, []).append(result)
    # what a perfect split would give: each agent's share proportional to its speed
    speeds = [CONCURRENCY / (ms / 1000) for ms in LATENCIES_MS]
    ideal_share_slow = speeds[2] / sum(speeds)
    ideal_rr = (n / 3) / speeds[2]
    ideal_ll = n / sum(speeds)
    summary: dict[str, dict[str, Any]] = {}
    for policy, rs in runs.items():
        summary[policy] = {
            "wall_s": med([r["wall_s"] for r in rs]),
            "wall_s_runs": [r["wall_s"] for r in rs],
            "slow_agent_share": med([r["slow_agent_share"] for r in rs]),
            "per_agent": rs[0].get("per_agent"),
            "request_span_s": med([r.get("request_span_s") for r in rs]),
        }
    ratio = None
    if "round_robin" in summary and "least_loaded" in summary and summary["least_loaded"]["wall_s"]:
        ratio = summary["round_robin"]["wall_s"] / summary["least_loaded"]["wall_s"]
    data: dict[str, Any] = {
        "n": n,
        "latencies_ms": LATENCIES_MS,
        "concurrency_per_agent": CONCURRENCY,
        "ideal_slow_agent_share": ideal_share_slow,
        "ideal_request_span_s": {"round_robin": ideal_rr, "least_loaded": ideal_ll},
        "speedup_least_loaded": ratio,
        "summary": summary,
        "runs": runs,
    }
    rows = [
        [
            policy,
            fmt(s["wall_s"], 2),
            fmt_range(s["wall_s_runs"], 2),
            fmt(s["request_span_s"], 2),
            fmt(data["ideal_request_span_s"][policy], 2),
            " / ".join(str((s["per_agent"] or {}).get(a, 0)) for a in ("a1", "a2", "a3")),
            f"{s['slow_agent_share']:.1%}",
        ]
        for policy, s in summary.items()
    ]
    md = [
        "## 6. Routing with one slow agent",
        "",
        f"{n} prompts; agents a1, a2, a3 on their own simulated servers "
        f"with {', '.join(str(x) for x in LATENCIES_MS)} ms latency, "
        f"{CONCURRENCY} in flight each, Parsl on this machine (2 workers). A speed-proportional split gives the slow agent "
        f"{ideal_share_slow:.1%}. 'ideal span' = the request phase if every slot were busy until the end.",
        "",
        md_table(
            ["routing", "wall s", "wall s (runs)", "request span s", "ideal span s", "prompts a1 / a2 / a3", "slow agent share"],
            rows,
        ),
        "",
        f"least_loaded finishes **{fmt(ratio, 2)}x** sooner than round_robin.",
    ]
    write_result(ctx, "routing", data, "\n".join(md))
    return data
