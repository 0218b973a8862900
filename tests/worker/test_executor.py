"""The worker side (executor.py): a chunk's slots, and how least_loaded shares a chunk's prompts."""

from __future__ import annotations

import uuid
from typing import Any

from parsl_chat.config import LimitsConfig
from parsl_chat.core.agents import AgentSpec
from parsl_chat.worker.executor import ChunkTask, WorkItem, lost_rows, run_chunk


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


def test_a_lost_chunk_is_one_error_row_per_prompt_with_its_place_in_the_run() -> None:
    """The run's dispatcher and the chat's /batch record a chunk whose worker died with the same rows."""
    agents = [AgentSpec(name="a1", system_prompt="", model="m", endpoint="http://127.0.0.1:9/v1")]
    turns = [
        {"custom_id": f"c-{t}", "line": 3 + t, "conversation": "c", "turn": t, "messages": [], "digest": f"d{t}"} for t in (1, 2)
    ]
    items = [WorkItem(prompts=turns, agent=0, submitted_at=1_700_000_000.0), *_items(7, 1)]
    task = ChunkTask(run_id="r", chunk_id=0, agents=agents, slots=[1], limits=LimitsConfig(), items=items)
    rows = lost_rows(task, "worker lost 3 times: ManagerLost: " + "x" * 1000)
    assert [r["custom_id"] for r in rows] == ["c-1", "c-2", "q7"]
    assert [r["agent"] for r in rows] == ["a1", "a1", None]  # an unassigned (least_loaded) item names no agent
    assert [(r["conversation"], r["turn"], r["digest"]) for r in rows[:2]] == [("c", 1, "d1"), ("c", 2, "d2")]
    assert all(r["status"] == "error" and r["error_type"] == "other" and r["attempts"] == 0 for r in rows)
    assert rows[0]["error"].startswith("worker lost 3 times: ManagerLost") and len(rows[0]["error"]) == 500
    assert rows[0]["submitted_at"].startswith("2023-11-14T22:13:20")
