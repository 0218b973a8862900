"""4. Real model: completion tokens/s through parsl-chat against direct requests to the same server.

One embedded model server (SmolLM2-135M on llama.cpp, what ``parsl-chat serve``
starts) is started once and warmed up; then, in turn: direct concurrent
requests (``bare_loop.py``, aiohttp, the leanest client), ``parsl-chat run``
with Parsl, and with ``--no-parsl``, all with the same prompts, system prompt,
``temperature 0`` (so every variant gets the same answers and token counts)
and the same number of requests in flight. tokens/s = completion tokens / wall
time of the whole process.
"""

from __future__ import annotations

import json
from typing import Any

from common import (
    Context,
    agents_config,
    fmt,
    fmt_range,
    interleaved,
    md_table,
    med,
    proposed_env,
    run_dir_name,
    run_parsl_chat,
    run_script,
    write_result,
)

TOPICS = (
    "Amdahl's law", "a hash table", "TCP slow start", "the CAP theorem", "a B-tree", "gradient descent",
    "photosynthesis", "a mutex", "the Doppler effect", "entropy", "a Bloom filter", "MapReduce",
)  # fmt: skip
IN_FLIGHT_PER_AGENT = 2  # x 3 agents = 6 in flight, as the shipped agents.yaml


def _available() -> str | None:
    try:
        from parsl_chat.serve.embedded import check_llama_server, embedded_model_path

        embedded_model_path()
        check_llama_server()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(ctx: Context) -> dict[str, Any]:
    problem = _available()
    if problem:
        data: dict[str, Any] = {"skipped": f"embedded model server unavailable: {problem}"}
        write_result(ctx, "model", data, "## 4. Real model\n\nskipped: " + data["skipped"])
        return data
    from parsl_chat.config import ServerConfig
    from parsl_chat.serve.server import ModelServer

    # 144 prompts: about a minute per run here. With 48 (20 s) the warm start answered every chunk in
    # the driver before Parsl's workers were up, so the Parsl variant never ran a request on Parsl.
    n, max_tokens = (6, 24) if ctx.quick else (144, 48)
    work = ctx.scratch("model")
    prompts = work / "prompts.jsonl"
    with prompts.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"In one sentence, what is {TOPICS[i % len(TOPICS)]}? ({i})"}) + "\n")
    params = {"temperature": 0.0, "max_tokens": max_tokens, "seed": 1}
    config = agents_config(work / "agents.yaml", agents=3, concurrency=IN_FLIGHT_PER_AGENT, params=params)
    in_flight = 3 * IN_FLIGHT_PER_AGENT
    server = ModelServer(ServerConfig(), log_path=work / "model-server.log")
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        url = server.start()
        ctx.log(f"  [model] embedded server at {url} (ready in {server.ready_s:.1f} s); warming up")
        model = ServerConfig().model
        run_script("bare_loop.py", str(prompts), url, "--concurrency", "1", "--client", "aiohttp", "--model", model,
                   "--system", "Be brief.", "--params", json.dumps({**params, "max_tokens": 4}))  # fmt: skip
        common = ("--config", str(config), "--endpoint", url, "--model", model)
        variants = {
            "direct requests (aiohttp)": lambda out: run_script(
                "bare_loop.py",
                str(prompts),
                url,
                "--concurrency",
                str(in_flight),
                "--client",
                "aiohttp",
                "--model",
                model,
                "--system",
                "Be brief.",
                "--params",
                json.dumps(params),
            ),
            "parsl-chat (Parsl HTEX)": lambda out: run_parsl_chat(ctx, prompts, out, *common),
            "parsl-chat --no-parsl": lambda out: run_parsl_chat(ctx, prompts, out, *common, "--no-parsl"),
        }
        env = proposed_env(ctx)
        if env is not None:
            variants["parsl-chat + proposals (Parsl HTEX)"] = lambda out: run_parsl_chat(ctx, prompts, out, *common, env=env)
        for rnd, label in interleaved(list(variants), ctx.repeats):
            ctx.log(f"  [model] round {rnd + 1}/{ctx.repeats}: {label} (N={n}, {in_flight} in flight, max_tokens {max_tokens})")
            result = variants[label](work / run_dir_name(rnd, len(runs.get(label, [])), label))
            result["round"] = rnd
            tokens = result.get("completion_tokens") or 0
            result["tokens_per_s"] = tokens / result["wall_s"] if result.get("wall_s") else None
            span = result.get("request_span_s") or result.get("loop_s")
            result["tokens_per_s_request_phase"] = tokens / span if span else None
            ctx.log(f"    wall {result['wall_s']:.1f} s, {tokens} tokens, {fmt(result['tokens_per_s'], 1)} tok/s")
            runs.setdefault(label, []).append(result)
    finally:
        server.stop()
    direct = {r["round"]: r for r in runs.get("direct requests (aiohttp)", [])}
    summary: dict[str, dict[str, Any]] = {}
    for label, rs in runs.items():
        ratios = [
            r["tokens_per_s"] / direct[r["round"]]["tokens_per_s"] for r in rs if r["round"] in direct and r.get("tokens_per_s")
        ]
        summary[label] = {
            "tokens_per_s": med([r.get("tokens_per_s") for r in rs]),
            "tokens_per_s_runs": [r.get("tokens_per_s") for r in rs],
            "tokens_per_s_request_phase": med([r.get("tokens_per_s_request_phase") for r in rs]),
            "completion_tokens": med([r.get("completion_tokens") for r in rs]),
            "wall_s": med([r.get("wall_s") for r in rs]),
            "vs_direct": med(ratios),
            "vs_direct_runs": ratios,
            "summary_completion_tokens_per_s": med([r.get("summary_completion_tokens_per_s") for r in rs]),
        }
    data = {"n": n, "max_tokens": max_tokens, "in_flight": in_flight, "summary": summary, "runs": runs}
    rows = [
        [
            label,
            fmt(s["completion_tokens"], 0),
            fmt(s["wall_s"], 1),
            fmt(s["tokens_per_s"], 1),
            f"{fmt(s['vs_direct'], 3)} ({fmt_range(s['vs_direct_runs'], 3)})",
            fmt(s["tokens_per_s_request_phase"], 1),
            fmt(s["summary_completion_tokens_per_s"], 1),
        ]
        for label, s in summary.items()
    ]
    md = [
        "## 4. Real model (embedded llama.cpp server, SmolLM2-135M)",
        "",
        f"{n} prompts, max_tokens {max_tokens}, temperature 0, {in_flight} requests in flight, one server shared by "
        "every variant (started once, warmed up). tokens/s = completion tokens / whole-process wall; "
        "'request phase' = tokens / (last answer - first request); 'summary.json' = parsl-chat's own figure.",
        "",
        md_table(
            [
                "variant",
                "completion tokens",
                "wall s",
                "tokens/s",
                "vs direct",
                "tokens/s request phase",
                "summary.json tokens/s",
            ],
            rows,
        ),
    ]
    write_result(ctx, "model", data, "\n".join(md))
    return data
