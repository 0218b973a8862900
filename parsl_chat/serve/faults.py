"""What the simulated endpoint does to a request: the :class:`FaultPlan`, and the prompt markers that win over it."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NOT_JSON", "FaultPlan", "Outcome", "draw_outcome", "extra_latency_ms", "spoilt"]

_SLOW_RE = re.compile(r"__slow_(\d+(?:\.\d+)?)__")
_INVALID_JSON_RE = re.compile(r"__invalid_json_(\d+)__")
_WRONG_SCHEMA_RE = re.compile(r"__wrong_schema_(\d+)__")
#: what a spoilt structured answer says: chat, not JSON, as small models do when not constrained
NOT_JSON = "Sure! Here is the JSON you asked for:"

#: 200, 500, 429, "hang", "drop" or "invalid" (200 with text that is not JSON)
Outcome = int | str


@dataclass(frozen=True)
class FaultPlan:
    """What the simulated endpoint does to each request."""

    latency_ms: float = 0.0  # fixed delay before answering each request
    jitter_ms: float = 0.0  # uniform extra delay in [0, jitter_ms]
    rate_500: float = 0.0  # fraction of requests answered 500
    rate_429: float = 0.0  # fraction answered 429 with a Retry-After header
    retry_after_s: float = 1.0
    rate_hang: float = 0.0  # fraction that never answer (until the client gives up)
    rate_drop: float = 0.0  # fraction whose connection is closed without a response
    completion_tokens: int = 16  # words in each answer
    max_concurrency: int = 0  # 0 = unlimited; else N slots, others queue
    model: str = "simulated"
    seed: int | None = None  # deterministic fault draws when set
    fail_first_attempts: int = 0  # each distinct prompt: 500 on its first N attempts
    rate_invalid_output: float = 0.0  # fraction answered 200 with text that is not JSON

    def __post_init__(self) -> None:
        # Fail at construction, not at the first request in the middle of a run.
        for name in ("latency_ms", "jitter_ms", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        rates = ("rate_500", "rate_429", "rate_hang", "rate_drop", "rate_invalid_output")
        for name in rates:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        total = sum(getattr(self, name) for name in rates)
        if total > 1.0 + 1e-9:
            raise ValueError(f"{' + '.join(rates)} must not exceed 1, got {total:g}")
        if self.completion_tokens < 1:
            raise ValueError(f"completion_tokens must be >= 1, got {self.completion_tokens}")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0, got {self.max_concurrency}")
        if self.fail_first_attempts < 0:
            raise ValueError(f"fail_first_attempts must be >= 0, got {self.fail_first_attempts}")
        if not self.model:
            raise ValueError("model must not be empty")


# --------------------------------------------------------------------------- server


def draw_outcome(plan: FaultPlan, prompt: str, attempt: int, u_fault: float) -> Outcome:
    """The fate of a request that passed validation: markers first, then the first attempts, then the rates."""
    if "__server_error__" in prompt:
        return 500
    if "__hang__" in prompt:
        return "hang"
    if attempt <= plan.fail_first_attempts:
        return 500
    edge = 0.0
    for rate, fate in (
        (plan.rate_500, 500),
        (plan.rate_429, 429),
        (plan.rate_hang, "hang"),
        (plan.rate_drop, "drop"),
        (plan.rate_invalid_output, "invalid"),
    ):
        edge += rate
        if u_fault < edge:
            return fate
    return 200


def extra_latency_ms(prompt: str) -> float:
    """What a ``__slow_<ms>__`` marker adds to the latency."""
    slow = _SLOW_RE.search(prompt)
    return float(slow.group(1)) if slow else 0.0


def spoilt(prompt: str, attempt: int) -> str | None:
    """The answer a ``__invalid_json_<n>__`` / ``__wrong_schema_<n>__`` marker asks for on this attempt, if any."""
    invalid = _INVALID_JSON_RE.search(prompt)
    if invalid and attempt <= int(invalid.group(1)):
        return NOT_JSON
    wrong = _WRONG_SCHEMA_RE.search(prompt)
    if wrong and attempt <= int(wrong.group(1)):
        return '["not", "an", "object"]'
    return None
