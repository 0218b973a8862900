"""The naive design, for contrast: one Parsl app per prompt.

A Parsl HighThroughputExecutor on this machine with C worker processes (one
request in flight each), every prompt submitted as its own ``python_app``
making one blocking ``openai`` call, results written as the futures finish.
This is what a first Parsl version of parsl-chat would look like.

    python benchmarks/naive_parsl.py PROMPTS URL --concurrency 12 --out results.jsonl

Prints one JSON object (same keys as bare_loop.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

T_START = time.time()
_CLIENT: Any = None


def ask(url: str, model: str, system: str, prompt: str) -> tuple[str, int, float, float]:
    """The app body: one blocking request with a client kept per worker process."""
    global _CLIENT
    import time as _time

    import openai

    if _CLIENT is None:
        _CLIENT = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    started = _time.time()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    resp = _CLIENT.chat.completions.create(model=model, messages=messages)
    text = resp.choices[0].message.content or ""
    return text, (resp.usage.completion_tokens if resp.usage else 0), started, _time.time()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompts")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=12, help="Parsl worker processes (requests in flight)")
    p.add_argument("--model", default="sim")
    p.add_argument("--system", default="")
    p.add_argument("--out")
    args = p.parse_args(argv)

    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    sys.path.insert(0, here)
    import naive_parsl  # the workers import the app body by this name
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    run_dir = tempfile.mkdtemp(prefix="naive-parsl-")
    config = Config(
        executors=[
            HighThroughputExecutor(
                label="naive",
                address="127.0.0.1",
                max_workers_per_node=args.concurrency,
                cores_per_worker=0.01,
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                encrypted=False,
            )
        ],
        run_dir=run_dir,
        strategy="none",
        usage_tracking=0,
    )
    dfk = parsl.load(config)
    app = parsl.python_app(naive_parsl.ask, executors=["naive"])
    t_loop = time.time()
    futures = {}
    with open(args.prompts, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                obj = json.loads(line)
                futures[app(args.url, args.model, args.system, obj["prompt"])] = str(obj.get("id") or f"line-{n}")
    ok = error = tokens = 0
    latency = 0.0
    first: float | None = None
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    for future in as_completed(futures):
        row: dict[str, Any] = {"custom_id": futures[future]}
        try:
            text, ntok, started, finished = future.result()
            ok += 1
            tokens += ntok
            latency += finished - started
            row.update(status="ok", response=text, started_at=started, finished_at=finished, completion_tokens=ntok)
        except Exception as exc:
            error += 1
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        if first is None:
            first = time.time()
        if out is not None:
            out.write(json.dumps(row) + "\n")
    t_done = time.time()
    if out is not None:
        out.close()
    dfk.cleanup()
    parsl.clear()
    shutil.rmtree(run_dir, ignore_errors=True)
    done = ok + error
    print(
        json.dumps(
            {
                "client": "openai (one Parsl app per prompt)",
                "concurrency": args.concurrency,
                "prompts": done,
                "ok": ok,
                "error": error,
                "completion_tokens": tokens,
                "mean_latency_s": latency / ok if ok else None,
                "startup_s": t_loop - T_START,
                "loop_s": t_done - t_loop,
                "first_result_s": (first - T_START) if first else None,
                "wall_s": time.time() - T_START,
            }
        )
    )
    return 0 if error == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
