"""7. The embedded model server's engines, side by side on the same GGUF file and CPU.

(a) llama-cpp-python's server (``server.engine: llama-cpp-python``, one request at a
time), (b) llama.cpp's ``llama-server`` with parallel slots and continuous batching
(``server.engine: llama-server``, slots and threads sized by parsl-chat from the job's
cores), (c) ``llama-batched-bench``, llama.cpp's own batched-decoding benchmark, at
(b)'s parallelism (its slots) with (b)'s mean prompt and completion lengths: what this
CPU does with no HTTP, no scheduling, every sequence the same length. (c) runs right
after each (b) run on the big workload and (b)/(c) is taken within that pair: over a
session the machine's speed drifts more than the gap the ratio is about.

(a) and (b) are whole ``parsl-chat run`` processes as a user runs them: the run starts
its own embedded server (start-up counted in the wall time), the agents' concurrency
is the default (it follows the server's slots). Two workloads: the quickstart itself
(``parsl-chat run examples/prompts.jsonl`` with the shipped agents.yaml) and 300
prompts at temperature 0. Each round runs every variant once, order rotated.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import (
    BENCH_DIR,
    Context,
    clean_env,
    fmt,
    fmt_range,
    interleaved,
    md_table,
    med,
    parsl_chat_argv,
    run_dir_name,
    run_dir_stats,
    timed,
    write_result,
    write_yaml,
)

if TYPE_CHECKING:
    from parsl_chat.core.llama_build import EmbeddedPlan

REPO = BENCH_DIR.parent
QUICKSTART = REPO / "examples" / "prompts.jsonl"
#: what each variant sets in the run's environment; (b1) is the default before all-core batches
ENGINES: dict[str, dict[str, str]] = {
    "(a) llama-cpp-python": {"PARSL_CHAT_SERVER_ENGINE": "llama-cpp-python"},
    "(b) llama-server": {"PARSL_CHAT_SERVER_ENGINE": "llama-server"},
    "(b1) llama-server, 1 batch thread": {"PARSL_CHAT_SERVER_ENGINE": "llama-server", "PARSL_CHAT_SERVER_BATCH_THREADS": "1"},
}
ENGINE_LABELS = {label[1 : label.index(")")]: label for label in ENGINES}  # "b1" -> its label
#: the ratios reported: (b)/(a) is the issue's target; (b)/(b1) what all-core batches add
PAIRS = (("b", "a"), ("b1", "a"), ("b", "b1"))
SUBJECTS = (
    "Amdahl's law",
    "a hash table",
    "TCP slow start",
    "the CAP theorem",
    "a B-tree",
    "gradient descent",
    "photosynthesis",
    "a mutex",
    "the Doppler effect",
    "entropy",
    "a Bloom filter",
    "MapReduce",
    "a batch scheduler",
    "cache coherence",
    "RAID 5",
    "a compiler",
    "public-key cryptography",
    "DNS",
    "a neural network",
    "plate tectonics",
    "inflation",
    "a binary search",
    "garbage collection",
    "OpenMP",
    "a GPU",
    "Little's law",
    "a checkpoint",
    "MPI",
    "a load balancer",
    "virtual memory",
)
ASKS = (
    "In one sentence, what is {}?",
    "Why does {} matter?",
    "Give one example of {}.",
    "Explain {} to a student.",
    "What is a common mistake about {}?",
    "How would you test {}?",
    "What limits {}?",
    "Compare {} with an alternative.",
    "When is {} the wrong choice?",
    "Summarize {} in ten words.",
)


def _available() -> str | None:
    try:
        from parsl_chat.core.llama_build import find_llama_build
        from parsl_chat.serve.embedded import check_llama_server, embedded_model_path

        embedded_model_path()
        check_llama_server()
        build, why = find_llama_build()
        if build is None:
            return why
        if build.batched_bench is None:
            return "llama-batched-bench was not built (run scripts/install)"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            ask = ASKS[(i // len(SUBJECTS)) % len(ASKS)].format(SUBJECTS[i % len(SUBJECTS)])
            fh.write(json.dumps({"id": f"p{i}", "prompt": ask}) + "\n")
    return path


def _token_means(run_dir: Path) -> tuple[float | None, float | None]:
    """Mean prompt and completion tokens of a run's ok rows."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = run_dir / "results.parquet"
    if not parquet.exists():
        return None, None
    table = pq.read_table(parquet, columns=["status", "prompt_tokens", "completion_tokens"])
    table = table.filter(pc.equal(table["status"], "ok"))
    if not table.num_rows:
        return None, None
    return pc.mean(table["prompt_tokens"]).as_py(), pc.mean(table["completion_tokens"]).as_py()


def run_engine(ctx: Context, prompts: Path, out: Path, settings: dict[str, str], config: Path | None) -> dict[str, Any]:
    """One ``parsl-chat run`` that starts its own embedded server, as ``settings`` (environment variables) say."""
    args = ["run", str(prompts), "--out", str(out), "--quiet"] + (["--config", str(config)] if config else [])
    t = timed(parsl_chat_argv(*args), env=clean_env(settings), cwd=REPO, timeout_s=1800)
    result: dict[str, Any] = t.brief()
    if t.rc != 0:
        result["error"] = (t.stderr or t.stdout)[-2000:]
        ctx.log(f"    ! parsl-chat exited {t.rc}: {(t.stderr or t.stdout)[-600:]}")
    result.update(run_dir_stats(out, t.t0))
    result["mean_prompt_tokens"], result["mean_completion_tokens"] = _token_means(out)
    result["server_log_head"] = _read(out / "logs" / "model-server.log")[:400]
    tokens, span, n = result.get("completion_tokens") or 0, result.get("request_span_s"), result.get("ok") or 0
    result["tokens_per_s"] = tokens / t.wall_s if t.wall_s else None
    result["prompts_per_s"] = n / t.wall_s if t.wall_s else None
    result["tokens_per_s_request_phase"] = tokens / span if span else None
    result["prompts_per_s_request_phase"] = n / span if span else None
    if not ctx.keep_runs:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def batched_bench(
    npl: list[int], npp: int, ntg: int, threads: int, batch_threads: int, env: dict[str, str] | None = None
) -> list[dict[str, float]]:
    """llama-batched-bench on the embedded GGUF: one row per parallel-sequence count in ``npl``; ``env``: added to ours."""
    from parsl_chat.core.llama_build import find_llama_build
    from parsl_chat.serve.embedded import embedded_model_path

    build, _ = find_llama_build()
    assert build is not None and build.batched_bench is not None
    ctx_size = max(npl) * (npp + ntg) + 64
    argv = [
        str(build.batched_bench),
        "-m",
        str(embedded_model_path()),
        "-c",
        str(ctx_size),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(npp),
        "-ntg",
        str(ntg),
        "-npl",
        ",".join(map(str, npl)),
        "-t",
        str(threads),
        "-tb",
        str(batch_threads),
        "--no-repack",
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench exited {proc.returncode}: {proc.stderr[-1000:]}")
    rows = []
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
            pp, tg, b, _kv, t_pp, s_pp, t_tg, s_tg, t, s = (float(c) for c in cells)
            rows.append(
                {
                    "npp": pp,
                    "ntg": tg,
                    "parallel": int(b),
                    "t_pp_s": t_pp,
                    "s_pp": s_pp,
                    "t_tg_s": t_tg,
                    "s_tg": s_tg,
                    "t_s": t,
                    "s": s,
                    # (b)'s figures: completion tokens and answers per second of the whole batch
                    "tokens_per_s": b * tg / t,
                    "prompts_per_s": b / t,
                }
            )
    if not rows:
        raise RuntimeError(f"no table in llama-batched-bench's output: {proc.stdout[-1000:]}")
    return [dict(r, wall_s=round(time.monotonic() - started, 2)) for r in rows]


def contention(plan: EmbeddedPlan, npp: int, ntg: int, repeats: int) -> list[dict[str, Any]]:
    """(c) at the plan's slots, alone and beside one busy process, for three ways to run the batch threads.

    llama.cpp's threads meet at a barrier after every operation: how a thread waits there
    decides what a descheduled one costs the others.
    """
    ways = {
        f"{plan.batch_threads} batch threads, {_assignments(plan.environment)}": (plan.batch_threads, plan.environment),
        f"{plan.batch_threads} batch threads, libgomp's default wait": (plan.batch_threads, {}),
        f"{max(1, plan.batch_threads - 1)} batch thread(s) (b1)": (max(1, plan.batch_threads - 1), {}),
    }
    rows = []
    for rnd, label in interleaved([f"{w} | {c}" for c in ("alone", "beside a busy process") for w in ways], repeats):
        way, condition = label.split(" | ")
        batch_threads, env = ways[way]
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition != "alone" else None
        try:
            row = batched_bench([plan.slots], npp, ntg, plan.threads, batch_threads, env)[0]
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        rows.append({"round": rnd, "way": way, "condition": condition, **row})
    return rows


def _assignments(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "no setting"


def contention_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    ways = list(dict.fromkeys(r["way"] for r in rows))
    cell = {
        (way, condition): fmt(med([r["tokens_per_s"] for r in rows if r["way"] == way and r["condition"] == condition]), 1)
        for way in ways
        for condition in ("alone", "beside a busy process")
    }
    return [[way, cell[way, "alone"], cell[way, "beside a busy process"]] for way in ways]


def _c_after(ctx: Context, plan: EmbeddedPlan, b_run: dict[str, Any]) -> dict[str, Any] | None:
    """(c): llama-batched-bench at (b)'s slots and threads, with this (b) run's mean prompt and completion lengths."""
    if b_run.get("error"):
        return None
    npp = round(b_run.get("mean_prompt_tokens") or 40)
    ntg = round(b_run.get("mean_completion_tokens") or 48)
    row = batched_bench([plan.slots], npp, ntg, plan.threads, plan.batch_threads, plan.environment)[0]
    ctx.log(f"    (c) llama-batched-bench, {plan.slots} parallel x ({npp} + {ntg}): {fmt(row['tokens_per_s'], 1)} tok/s")
    return row


def run(ctx: Context) -> dict[str, Any]:
    problem = _available()
    if problem:
        data: dict[str, Any] = {"skipped": f"llama-server or the embedded model unavailable: {problem}"}
        write_result(ctx, "engines", data, "## 8. Model server engines\n\nskipped: " + data["skipped"])
        return data
    from parsl_chat.config import ServerConfig
    from parsl_chat.core.llama_build import embedded_plan, job_cores

    plan = embedded_plan(ServerConfig(engine="llama-server"))
    work = ctx.scratch("engines")
    n = 30 if ctx.quick else 300
    max_tokens = 24 if ctx.quick else 64
    many = write_prompts(work / "prompts.jsonl", n)
    config = write_yaml(
        work / "agents.yaml",
        {
            "agents": [
                {"name": f"a{i + 1}", "system_prompt": "Be brief.", "params": {"temperature": 0.0, "max_tokens": max_tokens}}
                for i in range(3)
            ],
            "routing": "round_robin",
            "limits": {"timeout_s": 300},  # concurrency unset: the agents share the server's slots
            "server": {"kind": "embedded"},
        },
    )
    workloads = {"quickstart": (QUICKSTART, None), f"{n} prompts": (many, config)}
    # quick: the two engines only; (b1) and the contention sweep are for the write-up
    engines = [e for e in ENGINES if not (ctx.quick and e.startswith("(b1)"))]
    pairs = [(b, a) for b, a in PAIRS if ENGINE_LABELS[b] in engines and ENGINE_LABELS[a] in engines]
    variants = [f"{w} {e}" for w in workloads for e in engines]
    runs: dict[str, list[dict[str, Any]]] = {}
    big_b = f"{n} prompts (b) llama-server"
    for rnd, label in interleaved(variants, ctx.repeats):
        workload = next(w for w in workloads if label.startswith(w + " "))
        engine = ENGINES[label[len(workload) + 1 :]]
        prompts, cfg = workloads[workload]
        ctx.log(f"  [engines] round {rnd + 1}/{ctx.repeats}: {label}")
        result = run_engine(ctx, prompts, work / run_dir_name(rnd, len(runs.get(label, [])), label), engine, cfg)
        result["round"] = rnd
        ctx.log(
            f"    wall {result['wall_s']:.1f} s, {result.get('ok')} ok, {result.get('completion_tokens')} tokens, "
            f"{fmt(result['tokens_per_s'], 1)} tok/s ({fmt(result['tokens_per_s_request_phase'], 1)} in the request phase)"
        )
        runs.setdefault(label, []).append(result)
        if label == big_b:  # (c) right after it
            result["c"] = _c_after(ctx, plan, result)

    # the sweep over parallel sequences that sets parsl-chat's slots per core, at (b)'s mean lengths
    b_runs = runs.get(big_b, [])
    bench = [r["c"] for r in b_runs if r.get("c")]
    npp = round(med([r.get("mean_prompt_tokens") for r in b_runs]) or 40)
    ntg = round(med([r.get("mean_completion_tokens") for r in b_runs]) or 48)
    ctx.log("  [engines] (c) alone and beside a busy process, three ways to wait at llama.cpp's barriers")
    contended = [] if ctx.quick else contention(plan, npp, ntg, ctx.repeats)
    sweep_npl = sorted({1, 2, 4, 8, 16, plan.slots})
    sweep = {
        f"{t} generation threads": batched_bench(sweep_npl, npp, ntg, t, plan.batch_threads)
        for t in sorted({plan.threads, plan.batch_threads})
    }

    def summarise(rs: list[dict[str, Any]]) -> dict[str, Any]:
        keys = (
            "wall_s",
            "ok",
            "completion_tokens",
            "tokens_per_s",
            "prompts_per_s",
            "tokens_per_s_request_phase",
            "prompts_per_s_request_phase",
            "first_request_s",
            "mean_latency_ms",
            "summary_parallel_efficiency",
            "mean_prompt_tokens",
            "mean_completion_tokens",
        )
        return {k: med([r.get(k) for r in rs]) for k in keys}

    summary = {label: summarise(rs) for label, rs in runs.items()}
    ratios: dict[str, Any] = {}
    for workload, (b_name, a_name) in itertools.product(workloads, pairs):
        a = {r["round"]: r for r in runs.get(f"{workload} {ENGINE_LABELS[a_name]}", [])}
        b = {r["round"]: r for r in runs.get(f"{workload} {ENGINE_LABELS[b_name]}", [])}
        for key in ("tokens_per_s", "prompts_per_s", "tokens_per_s_request_phase", "prompts_per_s_request_phase"):
            within = [b[k][key] / a[k][key] for k in a if k in b and a[k].get(key) and b[k].get(key)]
            ratios[f"{workload} {b_name}/{a_name} {key}"] = {"median": med(within), "runs": within}
        walls = [a[k]["wall_s"] / b[k]["wall_s"] for k in a if k in b]
        ratios[f"{workload} {a_name}/{b_name} wall_s"] = {"median": med(walls), "runs": walls}
    c_tok, c_pr = med([r["tokens_per_s"] for r in bench]), med([r["prompts_per_s"] for r in bench])
    for key, c_key in (("tokens_per_s_request_phase", "tokens_per_s"), ("prompts_per_s_request_phase", "prompts_per_s")):
        # each (b) against the (c) run right after it: the machine's speed drifts over a session (seen: 130 to 163)
        within = [r[key] / r["c"][c_key] for r in b_runs if r.get(key) and r.get("c")]
        ratios[f"{n} prompts b/c {key}"] = {"median": med(within), "runs": within}
    data = {
        "n": n,
        "max_tokens": max_tokens,
        "cores": job_cores(),
        "plan": plan.describe(),
        "slots": plan.slots,
        "threads": plan.threads,
        "batch_threads": plan.batch_threads,
        "npp": npp,
        "ntg": ntg,
        "summary": summary,
        "ratios": ratios,
        "batched_bench": bench,
        "sweep": sweep,
        "contention": contended,
        "runs": runs,
    }

    def ratio(key: str) -> str:
        r = ratios.get(key) or {}
        return f"**{fmt(r.get('median'), 2)}** ({fmt_range(r.get('runs') or [], 2)})"

    rows = []
    for label, s in summary.items():
        rows.append(
            [
                label,
                fmt(s["ok"], 0),
                fmt(s["completion_tokens"], 0),
                fmt(s["wall_s"], 1),
                fmt(s["first_request_s"], 1),
                fmt(s["tokens_per_s"], 1),
                fmt(s["prompts_per_s"], 2),
                fmt(s["tokens_per_s_request_phase"], 1),
                fmt(s["prompts_per_s_request_phase"], 2),
                fmt(s["mean_latency_ms"] / 1000 if s["mean_latency_ms"] else None, 2),
                fmt(s["summary_parallel_efficiency"], 2),
            ]
        )
    rows.append(
        [
            f"(c) llama-batched-bench, {plan.slots} parallel x ({npp} + {ntg} tokens)",
            "–",
            "–",
            fmt(med([r["t_s"] for r in bench]), 2),
            "–",
            "–",
            "–",
            fmt(c_tok, 1),
            fmt(c_pr, 2),
            "–",
            "–",
        ]
    )
    ratio_rows = []
    for workload, (b_name, a_name) in itertools.product(workloads, pairs):
        ratio_rows.append(
            [
                f"{workload}: ({b_name})/({a_name})",
                ratio(f"{workload} {b_name}/{a_name} tokens_per_s"),
                ratio(f"{workload} {b_name}/{a_name} prompts_per_s"),
                ratio(f"{workload} {b_name}/{a_name} tokens_per_s_request_phase"),
                ratio(f"{workload} {b_name}/{a_name} prompts_per_s_request_phase"),
                ratio(f"{workload} {a_name}/{b_name} wall_s"),
            ]
        )
    ratio_rows.append(
        [
            f"{n} prompts: (b)/(c)",
            "–",
            "–",
            ratio(f"{n} prompts b/c tokens_per_s_request_phase"),
            ratio(f"{n} prompts b/c prompts_per_s_request_phase"),
            "–",
        ]
    )
    sweep_rows = [
        [label, r["parallel"], fmt(r["s_tg"], 1), fmt(r["tokens_per_s"], 1), fmt(r["s"], 1)]
        for label, rs in sweep.items()
        for r in rs
    ]
    md = [
        "## 8. Model server engines (SmolLM2-135M Q4_1, same GGUF file)",
        "",
        f"{plan.describe()}. (a) and (b): whole `parsl-chat run` processes, each starting its own embedded server, "
        f"default concurrency (follows the slots); quickstart = `examples/prompts.jsonl` with the shipped agents.yaml; "
        f"{n} prompts at temperature 0, max_tokens {max_tokens}, 3 agents. {ctx.repeats} round(s), order rotated. "
        "tokens/s = completion tokens / wall of the whole process; 'request phase' = / (last answer - first request).",
        "",
        md_table(
            [
                "variant",
                "ok",
                "completion tokens",
                "wall s",
                "first request s",
                "tokens/s",
                "prompts/s",
                "tokens/s request phase",
                "prompts/s request phase",
                "mean latency s",
                "parallel efficiency",
            ],
            rows,
        ),
        "",
        md_table(
            [
                "ratio (within a round)",
                "tokens/s",
                "prompts/s",
                "tokens/s request phase",
                "prompts/s request phase",
                "wall, inverse",
            ],
            ratio_rows,
        ),
        "",
        f"llama-batched-bench sweep ({npp} prompt + {ntg} generated tokens per sequence, {plan.batch_threads} prompt threads):",
        "",
        md_table(
            ["threads", "parallel sequences", "generation t/s (S_TG)", "completion tokens/s, whole batch", "all tokens/s"],
            sweep_rows,
        ),
    ]
    if contended:
        md += [
            "",
            f"llama-batched-bench at {plan.slots} parallel sequences, alone and beside one busy process "
            "(completion tokens/s of the batch, median over rounds):",
            "",
            md_table(["batch threads, waiting", "alone", "beside a busy process"], contention_rows(contended)),
        ]
    write_result(ctx, "engines", data, "\n".join(md))
    return data
