"""The reference point: one asyncio loop, one client, C requests in flight.

What a user would write instead of parsl-chat: read the prompts file, keep C
requests in flight with a semaphore-free worker pool, write one JSON line per
answer. ``--client openai`` (the issue's baseline: ``openai.AsyncOpenAI``),
``httpx`` or ``aiohttp`` (the leanest client, to show the floor of the server).

Run as a separate process so that its wall time includes start-up, like the
``parsl-chat run`` process it is compared with. Prints one JSON object.

    python benchmarks/bare_loop.py PROMPTS URL --concurrency 12 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

T_START = time.time()


def _prompts(path: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            yield str(obj.get("id") or f"line-{n}"), obj["prompt"]


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    source = _prompts(args.prompts)
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    stats = {"ok": 0, "error": 0, "completion_tokens": 0, "latency_s": 0.0}
    messages_head: list[Any] = [{"role": "system", "content": args.system}] if args.system else []

    if args.client == "openai":
        import openai

        oclient = openai.AsyncOpenAI(base_url=args.url, api_key="x", max_retries=0, timeout=120)

        async def ask(prompt: str) -> tuple[str, int]:
            resp = await oclient.chat.completions.create(
                model=args.model, messages=[*messages_head, {"role": "user", "content": prompt}], **args.params
            )
            return resp.choices[0].message.content or "", (resp.usage.completion_tokens if resp.usage else 0)

    elif args.client == "httpx":
        import httpx

        hclient = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024), timeout=120)
        url = args.url.rstrip("/") + "/chat/completions"

        async def ask(prompt: str) -> tuple[str, int]:
            body = {"model": args.model, "messages": [*messages_head, {"role": "user", "content": prompt}], **args.params}
            resp = await hclient.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})
            resp.raise_for_status()
            data = resp.json()
            return data["choices"][0]["message"]["content"] or "", data.get("usage", {}).get("completion_tokens") or 0

    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120))
        url = args.url.rstrip("/") + "/chat/completions"

        async def ask(prompt: str) -> tuple[str, int]:
            body = {"model": args.model, "messages": [*messages_head, {"role": "user", "content": prompt}], **args.params}
            async with session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
                data = await resp.json()
            return data["choices"][0]["message"]["content"] or "", data.get("usage", {}).get("completion_tokens") or 0

    first_finish: list[float] = []

    async def worker() -> None:
        for custom_id, prompt in source:  # a shared iterator: each worker takes the next prompt
            started = time.time()
            try:
                text, tokens = await ask(prompt)
                status, error = "ok", None
            except Exception as exc:
                text, tokens, status, error = "", 0, "error", f"{type(exc).__name__}: {exc}"
            finished = time.time()
            if not first_finish:
                first_finish.append(finished)
            stats[status] += 1
            stats["completion_tokens"] += tokens
            stats["latency_s"] += finished - started
            if out is not None:
                row: dict[str, Any] = {"custom_id": custom_id, "status": status, "error": error, "response": text}
                row.update(started_at=started, finished_at=finished, completion_tokens=tokens)
                out.write(json.dumps(row) + "\n")

    t_loop = time.time()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    t_done = time.time()
    if out is not None:
        out.close()
    done = stats["ok"] + stats["error"]
    return {
        "client": args.client,
        "concurrency": args.concurrency,
        "prompts": done,
        "ok": stats["ok"],
        "error": stats["error"],
        "completion_tokens": stats["completion_tokens"],
        "mean_latency_s": stats["latency_s"] / done if done else None,
        "startup_s": t_loop - T_START,
        "loop_s": t_done - t_loop,
        "first_result_s": first_finish[0] - T_START if first_finish else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompts")
    p.add_argument("url", help="base URL ending in /v1")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--client", choices=("openai", "httpx", "aiohttp"), default="openai")
    p.add_argument("--model", default="sim")
    p.add_argument("--system", default="", help="system prompt sent with every request")
    p.add_argument("--params", default="{}", help="JSON object merged into every request body")
    p.add_argument("--out", help="write one JSON line per answer here")
    args = p.parse_args(argv)
    args.params = json.loads(args.params)
    result = asyncio.run(_main(args))
    result["wall_s"] = time.time() - T_START
    print(json.dumps(result))
    return 0 if result["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
