"""llama.cpp's llama-server on the real model: parallel slots, its /metrics, least_loaded against two of them.

These need the llama-server scripts/install builds (CI runs scripts/install, so there
they must run: a missing build is a skip, which CI=true turns into a failure).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PORTABLE, installed_kind, run_cli

from parsl_chat.config import ServerConfig
from parsl_chat.core.limits import ServerLoad, server_load
from parsl_chat.core.llama_build import OPENMP_SPIN_COUNT, find_llama_build
from parsl_chat.serve import crash
from parsl_chat.serve import server as srv

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"


def _require_build() -> None:
    build, why = find_llama_build()
    if build is None:
        pytest.skip(f"llama-server unavailable: {why}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, srv.ModelServer]]:
    """Three real llama-servers of the embedded model: 4, 1 and 8 slots, one thread each."""
    _require_build()
    folder = tmp_path_factory.mktemp("llama-server")
    started: dict[int, srv.ModelServer] = {}
    try:
        for slots in (4, 1, 8):
            server = srv.ModelServer(ServerConfig(engine="llama-server", slots=slots), log_path=folder / f"{slots}.log")
            # one thread each (as on a 1-core job): two servers on this 2-core machine, not four spinning threads
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SLURM_CPUS_ON_NODE", "1")
                server.start()
            assert server.plan is not None and (server.plan.threads, server.plan.batch_threads) == (1, 1)
            started[slots] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


def _ask(url: str, n: int, max_tokens: int = 48) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a short story about the number {n}."}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "seed": 1,
    }
    started = time.monotonic()
    answer = httpx.post(f"{url}/chat/completions", json=body, timeout=300).json()
    answer["_span"] = (started, time.monotonic())
    return answer


async def _load(url: str) -> ServerLoad | None:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await server_load(client, url)


def test_llama_server_build_is_portable_unless_built_native() -> None:
    _require_build()
    build, _ = find_llama_build()
    assert build is not None and build.batched_bench is not None, "scripts/install builds llama-batched-bench too"
    features = srv.llama_build_features(build.system_info)
    assert features, f"no system info recorded for {build.server}"
    if build.kind.startswith(("native", "custom")) or installed_kind() in ("native", "custom"):
        assert not srv.unsupported_features(features)
        return
    beyond = [f for f in features if f in crash._CPU_FLAGS and f not in PORTABLE]
    assert not beyond, f"the portable llama-server was compiled with {beyond}: SIGILL on older CPUs"
    result = subprocess.run([str(build.server), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, srv.describe_exit(result.returncode)


@pytest.mark.parametrize("user_spin", [None, "20000"])
def test_slots_decode_on_every_core_with_brief_openmp_waits(user_spin: str | None, tmp_path: Path) -> None:
    """On a 2-core job: 1 generation + 2 batch threads, and libgomp spins briefly (BENCHMARKS.md §8) unless the user set it."""
    _require_build()
    build, _ = find_llama_build()
    assert build is not None and build.openmp, f"scripts/install's build of llama.cpp uses OpenMP: {build}"
    server = srv.ModelServer(ServerConfig(engine="llama-server"), log_path=tmp_path / "server.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CPUS_ON_NODE", "2")
        patch.delenv("OMP_WAIT_POLICY", raising=False)
        if user_spin is None:
            patch.delenv("GOMP_SPINCOUNT", raising=False)
        else:
            patch.setenv("GOMP_SPINCOUNT", user_spin)
        server.start()
    try:
        assert server.url is not None and server.pid is not None
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")
        flags = dict(itertools.pairwise(argv))
        assert (flags["--threads"], flags["--threads-batch"]) == ("1", "2")
        environ = dict(e.split("=", 1) for e in Path(f"/proc/{server.pid}/environ").read_bytes().decode().split("\0") if "=" in e)
        spin = user_spin or str(OPENMP_SPIN_COUNT)
        assert environ["GOMP_SPINCOUNT"] == spin
        assert f"OpenMP threads wait with GOMP_SPINCOUNT={spin}" in (tmp_path / "server.log").read_text()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: _ask(server.url, n, 16), range(4)))  # type: ignore[arg-type]
        assert all(a["usage"]["completion_tokens"] > 0 for a in answers)
    finally:
        server.stop()


def test_parallel_requests_overlap_at_the_server(servers: dict[int, srv.ModelServer]) -> None:
    server = servers[4]
    assert server.url is not None and server.plan is not None and server.plan.slots == 4
    assert server.build_features, "the build features recorded at install time reach the log"
    props = httpx.get(server.url.removesuffix("/v1") + "/props", timeout=30).json()
    assert props["total_slots"] == 4
    seen: list[ServerLoad | None] = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_ask, server.url, n, 96) for n in range(4)]
        while not all(f.done() for f in futures):
            seen.append(asyncio.run(_load(server.url)))
            time.sleep(0.05)
        answers = [f.result() for f in futures]
    # all four were in a slot at once (the server says so), and their times overlap
    assert max(load.running for load in seen if load is not None) == 4, seen
    spans = [a["_span"] for a in answers]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    for answer in answers:
        assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["message"]["content"]
        assert answer["timings"]["predicted_n"] == answer["usage"]["completion_tokens"]  # per-response timings


def test_a_saturated_server_reports_its_queue(servers: dict[int, srv.ModelServer]) -> None:
    url = servers[1].url
    assert url is not None
    seen: list[ServerLoad | None] = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_ask, url, n, 64) for n in range(3)]
        while not all(f.done() for f in futures):
            seen.append(asyncio.run(_load(url)))
            time.sleep(0.05)
    loads = [load for load in seen if load is not None]
    assert loads, "llama-server answered no /metrics"
    assert max(load.running for load in loads) == 1
    assert max(load.waiting for load in loads) >= 1, loads  # requests_deferred: waiting for the one slot


def test_least_loaded_gives_the_slower_real_server_fewer_prompts(servers: dict[int, srv.ModelServer], tmp_path: Path) -> None:
    """Two real llama-servers through the CLI: 8 slots and 1 slot, one thread each, 8 client slots each.

    The 1-slot server answers one request at a time; the 8-slot one decodes 8 together, about
    2.5x the requests per second on one thread here. least_loaded reads both /metrics
    (requests_processing, requests_deferred) and the per-response timings: a free server slot
    is used, a request that would queue goes where it would be answered soonest. The 1-slot
    server gets clearly fewer prompts, though the client could keep 8 in its queue.
    """
    fast, slow = servers[8].url, servers[1].url
    assert fast and slow
    n = 48
    prompts = tmp_path / "prompts.jsonl"
    lines = (json.dumps({"id": f"p{i}", "prompt": f"Name one use of the number {i}."}) for i in range(n))
    prompts.write_text("".join(line + "\n" for line in lines))
    config = tmp_path / "agents.yaml"
    agent = {"system_prompt": "Be brief.", "model": MODEL, "params": {"temperature": 0.0, "max_tokens": 32}}
    config.write_text(
        yaml.safe_dump(
            {
                # the slow one first: a tie-break or start-up bias towards the first agent would show
                "agents": [{"name": "slow", "endpoint": slow, **agent}, {"name": "fast", "endpoint": fast, **agent}],
                "routing": "least_loaded",
                "limits": {"concurrency": 8, "timeout_s": 300},
                "server": {"kind": "none"},
            }
        )
    )
    out = tmp_path / "run"
    result = run_cli("run", str(prompts), "--config", str(config), "--out", str(out), "--no-parsl", "--quiet", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    per_agent = {name: sum(r["agent"] == name for r in rows) for name in ("slow", "fast")}
    # an even split is 24 each (round_robin's); clearly fewer: at most half the fast one's
    assert per_agent["slow"] <= n // 3 and per_agent["fast"] >= 2 * per_agent["slow"], per_agent
    # the servers' timings reach the results
    assert all(r["server_generation_s"] is not None and r["server_queue_s"] is not None for r in rows)
