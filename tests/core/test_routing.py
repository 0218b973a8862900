"""Unit tests for parsl_chat.core.routing: smooth weighted round-robin, pins, least_loaded."""

from __future__ import annotations

from collections import Counter

import pytest

from parsl_chat.core.agents import AgentSpec
from parsl_chat.core.routing import ROUTINGS, Router, SmoothRoundRobin
from parsl_chat.errors import ConfigError


def agents(*weights: float) -> list[AgentSpec]:
    return [
        AgentSpec(name=f"a{i}", system_prompt="s", model="m", endpoint="http://e/v1", weight=w) for i, w in enumerate(weights)
    ]


def test_routings_match_config() -> None:
    from parsl_chat import config

    assert ROUTINGS == config.ROUTINGS == ("round_robin", "least_loaded")


def test_equal_weights_cycle() -> None:
    rr = SmoothRoundRobin([1, 1, 1])
    assert [rr.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_smooth_interleaving_2_1_1() -> None:
    rr = SmoothRoundRobin([2, 1, 1])
    seq = [rr.next() for _ in range(8)]
    assert seq == [0, 1, 2, 0, 0, 1, 2, 0]
    # never the heavy agent three times running, and each window of 4 is exact
    for start in range(0, 8, 4):
        assert Counter(seq[start : start + 4]) == {0: 2, 1: 1, 2: 1}


def test_nginx_example_5_1_1() -> None:
    rr = SmoothRoundRobin([5, 1, 1])
    assert [rr.next() for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


@pytest.mark.parametrize("weights", [[3, 1], [1, 2, 3, 4], [0.5, 0.25, 0.25], [7], [1, 1, 1, 1, 1]])
def test_exact_proportions_over_a_period(weights: list[float]) -> None:
    rr = SmoothRoundRobin(weights)
    scale = 4 if any(w != int(w) for w in weights) else 1
    period = int(sum(weights) * scale)
    counts = Counter(rr.next() for _ in range(period * 10))
    for i, w in enumerate(weights):
        assert counts[i] == w * scale * 10


def test_deterministic() -> None:
    a, b = SmoothRoundRobin([3, 2, 1]), SmoothRoundRobin([3, 2, 1])
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)]


def test_empty_weights() -> None:
    with pytest.raises(ValueError):
        SmoothRoundRobin([])


def test_router_round_robin_and_pins() -> None:
    router = Router(agents(1, 1, 1), "round_robin")
    assert router.assign(None) == 0
    assert router.assign("a2") == 2  # a pin does not advance the rotation
    assert router.assign(None) == 1
    assert router.assign("a0") == 0
    assert router.assign(None) == 2
    assert router.assign(None) == 0


def test_router_weights_follow_agents() -> None:
    router = Router(agents(2, 1, 1))
    counts = Counter(router.assign(None) for _ in range(400))
    assert counts == {0: 200, 1: 100, 2: 100}


def test_router_least_loaded() -> None:
    router = Router(agents(1, 1), "least_loaded")
    assert [router.assign(None) for _ in range(3)] == [None, None, None]
    assert router.assign("a1") == 1


def test_router_unknown_pins() -> None:
    router = Router(agents(1, 1))
    assert router.unknown_pins(["a0", "zz", "a1", "yy"]) == ["zz", "yy"]
    assert router.unknown_pins([]) == []


def test_router_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="unknown routing 'random'; valid: round_robin, least_loaded"):
        Router(agents(1), "random")


def test_router_repr_and_names() -> None:
    router = Router(agents(1, 1), "least_loaded")
    assert router.names == ["a0", "a1"]
    assert router.index == {"a0": 0, "a1": 1}
    assert repr(router) == "Router(policy='least_loaded', agents=['a0', 'a1'])"
