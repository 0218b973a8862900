"""7. Response cache: a re-run answered wholly from the cache, against the run that filled it.

Zero-latency simulated server, 3 agents x 16, temperature 0, the local profile (Parsl),
generated prompts. Three runs side by side in each round: ``no cache`` (the same
prompts, no cache: the baseline), ``fill`` (the first run with an empty cache: every
prompt a miss, every answer stored) and ``re-run`` (the same prompts again: 100 %
hits, no request sent: the server's request count is checked). Wall time and driver
peak memory (``VmHWM``) as in benchmark 3. Then the cache directory itself: the size
of its files, ``cache compact``'s time, and what a reader's index costs (load time,
bytes of index per entry, RSS growth), before and after compaction, and for a
synthetic 1M-entry cache in full mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import (
    Context,
    agents_config,
    fmt,
    md_table,
    med,
    parsl_chat_argv,
    run_parsl_chat,
    simulated,
    timed,
    write_prompts,
    write_result,
)

VARIANTS = ("no cache", "fill", "re-run")

#: measures one Reader in a fresh interpreter: load time, index bytes, RSS growth, lookups/s
_READER_PROBE = r"""
import itertools, json, os, sys, time
from pathlib import Path
from parsl_chat.io import cache
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

root = Path(sys.argv[1])
before = rss_mb()
t0 = time.perf_counter()
reader = cache.Reader(root)
reader.refresh(force=True)
load_s = time.perf_counter() - t0
keys = [key for key, _ in itertools.islice(cache.iter_records(root), 20000)]
t0 = time.perf_counter()
found = sum(reader.get(k) is not None for k in keys)
lookup_s = time.perf_counter() - t0
index_bytes = sum(a.nbytes for a in (reader.prefixes, reader.seconds, reader.numbers, reader.offsets))
print(json.dumps({
    "entries": len(reader), "load_s": round(load_s, 3), "index_bytes_per_entry": index_bytes / max(1, len(reader)),
    "rss_growth_mb": round(rss_mb() - before, 1), "lookups_per_s": round(len(keys) / lookup_s) if keys else None,
    "found": found, "probed": len(keys),
}))
"""

#: writes N synthetic entries (about the size of the benchmark's answers) with the cache's own writer
_FILL = r"""
import sys
from pathlib import Path
from parsl_chat.io import cache
from parsl_chat.config import CacheConfig

root = Path(cache.prepare(CacheConfig(dir=sys.argv[1])).dir)
writer = cache.Writer(root)
answer = "sim Question explain item of the benchmark in one line. tok tok tok tok tok tok tok"
for i in range(int(sys.argv[2])):
    body = {"model": "sim", "messages": [{"role": "user", "content": f"Question {i}"}], "temperature": 0}
    record = {"model": "sim", "response": answer, "finish_reason": "stop", "prompt_tokens": 14, "completion_tokens": 16,
              "latency_s": 0.001, "finished_at": "2026-01-01T00:00:00+00:00", "run_id": "synthetic"}
    writer.append(cache.encode_line(cache.request_key(body), record))
writer.seal()
"""


def _probe(root: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", _READER_PROBE, str(root)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _dir_mb(root: Path) -> float:
    return round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20, 1)


def _compact(root: Path) -> dict[str, Any]:
    t = timed(parsl_chat_argv("cache", "compact", str(root), "--idle-s", "0"), timeout_s=3600)
    return {"compact_s": round(t.wall_s, 2), "compact_rc": t.rc, "compact_peak_rss_mb": t.driver_peak_rss_mb}


def _index_costs(ctx: Context, root: Path, label: str) -> list[dict[str, Any]]:
    rows = [{"cache": label, "state": "segments", "dir_mb": _dir_mb(root), **_probe(root)}]
    compacted = _compact(root)
    rows.append({"cache": label, "state": "compacted", "dir_mb": _dir_mb(root), **compacted, **_probe(root)})
    for row in rows:
        ctx.log(f"    [cache] {label} {row['state']}: {json.dumps({k: v for k, v in row.items() if k != 'error'})}")
    return rows


def run(ctx: Context) -> dict[str, Any]:
    n = 5_000 if ctx.quick else 100_000
    work = ctx.scratch("cache")
    config = agents_config(work / "agents.yaml", agents=3, concurrency=16, params={"temperature": 0})
    prompts = write_prompts(work / f"prompts-{n}.jsonl", n)
    runs: list[dict[str, Any]] = []
    for rnd in range(ctx.repeats):
        store = work / f"cache-{rnd}"  # each round fills its own cache: the re-run is always 100 % hits
        for variant in VARIANTS:
            # a server per run: its request log (bounded at 200,000 entries) is that run's alone
            with simulated(0) as server:
                args = ["--config", str(config), "--endpoint", server.url, "--model", "sim"]
                if variant != "no cache":
                    args += ["--cache", str(store)]
                ctx.log(f"  [cache] round {rnd + 1}: {n:,} prompts, {variant}")
                out = work / f"run-{rnd}-{variant.replace(' ', '-')}"
                result = run_parsl_chat(ctx, prompts, out, *args, timeout_s=4 * 3600)
                result.update(round=rnd, variant=variant, n=n, requests_sent=len(server.requests()))
            ctx.log(
                f"    wall {fmt(result.get('wall_s'), 1)} s, driver peak {result.get('driver_peak_rss_mb')} MB, "
                f"{result['requests_sent']:,} requests sent"
            )
            runs.append(result)
    last_store = work / f"cache-{ctx.repeats - 1}"
    index = _index_costs(ctx, last_store, f"{n:,} (this benchmark's)")
    if not ctx.quick:
        synthetic = work / "cache-1m"
        subprocess.run([sys.executable, "-c", _FILL, str(synthetic), "1000000"], check=True, timeout=3600)
        index += _index_costs(ctx, synthetic, "1,000,000 (synthetic)")
    data = _figures(runs, n)
    data["index"] = index
    write_result(ctx, "cache", data, _markdown(data, n))
    return data


def _figures(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["variant"]] = r

    def ratio(key: str, top: str, bottom: str) -> list[float | None]:
        out = []
        for rnd in by_round.values():
            a, b = rnd.get(top, {}).get(key), rnd.get(bottom, {}).get(key)
            out.append(a / b if a and b else None)
        return out

    return {
        "n": n,
        "runs": runs,
        "medians": {
            v: {
                key: med([r.get(key) for r in runs if r["variant"] == v])
                for key in ("wall_s", "driver_peak_rss_mb", "rss_mb_dispatch_peak", "rss_mb_end_peak", "requests_sent", "ok")
            }
            for v in VARIANTS
        },
        "rerun_vs_fill_wall": ratio("wall_s", "re-run", "fill"),
        "rerun_vs_fill_peak": ratio("driver_peak_rss_mb", "re-run", "fill"),
        "fill_vs_no_cache_wall": ratio("wall_s", "fill", "no cache"),
        "fill_vs_no_cache_peak": ratio("driver_peak_rss_mb", "fill", "no cache"),
    }


def _markdown(data: dict[str, Any], n: int) -> str:
    rows = [
        [
            str(r["round"] + 1),
            r["variant"],
            fmt(r.get("wall_s"), 1),
            fmt(r.get("driver_peak_rss_mb"), 1),
            fmt(r.get("rss_mb_dispatch_peak"), 1),
            fmt(r.get("rss_mb_end_peak"), 1),
            f"{r['requests_sent']:,}",
            f"{r.get('ok', 0):,}/{n:,}",
        ]
        for r in data["runs"]
    ]
    index_rows = [
        [
            i["cache"],
            i["state"],
            fmt(i.get("dir_mb"), 1),
            fmt(i.get("compact_s"), 1) if "compact_s" in i else "",
            fmt(i.get("load_s"), 2),
            fmt(i.get("index_bytes_per_entry"), 0),
            fmt(i.get("rss_growth_mb"), 1),
            f"{i['lookups_per_s']:,}" if i.get("lookups_per_s") else "-",
        ]
        for i in data["index"]
    ]

    def ratios(key: str) -> str:
        return ", ".join(fmt(v, 2) for v in data[key])

    return "\n".join(
        [
            "## 7. Response cache",
            "",
            f"{n:,} prompts, zero-latency simulated server, 3 agents x 16, temperature 0, local profile (Parsl). "
            "Each round: the same prompts with no cache, then filling an empty cache, then again from the full cache "
            "(every prompt a hit). 'requests' = requests the server received during that run.",
            "",
            md_table(["round", "run", "wall s", "driver peak MB", "dispatch MB", "end MB", "requests", "ok"], rows),
            "",
            f"Re-run / fill, per round: wall **{ratios('rerun_vs_fill_wall')}**, driver peak "
            f"**{ratios('rerun_vs_fill_peak')}**. Fill / no cache: wall {ratios('fill_vs_no_cache_wall')}, "
            f"driver peak {ratios('fill_vs_no_cache_peak')}.",
            "",
            "The cache directory, read by one `Reader` in a fresh interpreter (what each worker process holds): "
            "time to load the index, its bytes per entry, the RSS it added, and lookups/s over up to 20,000 keys "
            "(index search, one line read and parsed each). 'compact s' = `parsl-chat cache compact` as a process.",
            "",
            md_table(
                ["cache entries", "state", "dir MB", "compact s", "index load s", "bytes/entry", "RSS +MB", "lookups/s"],
                index_rows,
            ),
        ]
    )
