"""The worker side (executor.py): a chunk's slots, and how least_loaded shares a chunk's prompts."""

from __future__ import annotations

import uuid
from typing import Any

from parsl_chat.config import LimitsConfig
from parsl_chat.core.agents import AgentSpec
from parsl_chat.worker.executor import ChunkTask, WorkItem, run_chunk


def _items(first: int, count: int) -> list[WorkItem]:
    """Prompts any agent may take (least_loaded leaves the choice to the first free slot)."""
    return [
        WorkItem(
            prompts=[{"custom_id": f"q{i}", "line": i, "messages": [{"role": "user", "content": f"hi {i}"}], "digest": "d"}],
            agent=None,
        )
        for i in range(first, first + count)
    ]


def test_a_slow_agent_leaves_the_last_shared_prompts_to_faster_ones(sim_server: Any) -> None:
    fast, slow = sim_server(latency_ms=20), sim_server(latency_ms=1000)
    agents = [
        AgentSpec(name="fast", system_prompt="", model="sim", endpoint=fast.url, concurrency=2),
        AgentSpec(name="slow", system_prompt="", model="sim", endpoint=slow.url, concurrency=1),
    ]
    run_id = f"test-{uuid.uuid4().hex[:8]}"  # the worker keeps each agent's answer times per run

    def chunk(chunk_id: int, items: list[WorkItem]) -> ChunkTask:
        return ChunkTask(run_id=run_id, chunk_id=chunk_id, agents=agents, slots=[2, 1], limits=LimitsConfig(), items=items)

    first = run_chunk(chunk(0, _items(0, 6)))
    # nothing known yet: the slow agent's slot takes a prompt like any other
    assert len(first) == 6 and "slow" in {row["agent"] for row in first}
    second = run_chunk(chunk(1, _items(6, 8)))
    # two fast slots clear 8 prompts in ~80 ms, long before one slow answer (1 s) would be back:
    # had the slow slot taken one, the whole chunk would wait for it
    assert sorted(row["custom_id"] for row in second) == sorted(f"q{i}" for i in range(6, 14))
    assert {row["agent"] for row in second} == {"fast"} and all(row["status"] == "ok" for row in second)
