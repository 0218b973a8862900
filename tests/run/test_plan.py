"""plan: how a run's agents' limits are split over Parsl's worker processes."""

from __future__ import annotations

import io

from rich.console import Console

from parsl_chat.core.agents import AgentSpec
from parsl_chat.run.plan import effective_concurrency, slots_per_worker


def _agents(given: bool) -> list[AgentSpec]:
    return [AgentSpec(name=n, system_prompt="", model="m", endpoint="e", concurrency=3, concurrency_given=given) for n in "ab"]


def test_a_limit_the_user_set_is_rounded_with_a_note() -> None:
    out = io.StringIO()
    agents = _agents(given=True)
    effective = effective_concurrency(agents, slots_per_worker(agents, 2, False), 2, False, Console(file=out))
    assert [a.concurrency for a in effective] == [4, 4]  # round(3 / 2) = 2 per worker, 2 workers
    assert out.getvalue().count("note: agent") == 2 and "use a multiple of 2" in out.getvalue()


def test_our_own_default_is_rounded_silently() -> None:
    """The quickstart's agents share the embedded server's slots by default: no note about a number nobody chose."""
    out = io.StringIO()
    agents = _agents(given=False)
    effective = effective_concurrency(agents, slots_per_worker(agents, 2, False), 2, False, Console(file=out))
    assert [a.concurrency for a in effective] == [4, 4] and out.getvalue() == ""
