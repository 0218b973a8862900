"""The resolved settings, and where each value came from (:class:`Source`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .profiles import ProfileConfig
from .schema import NESTED, REDACTED, RunConfig, Secret

__all__ = ["DEFAULT", "Settings", "Source"]


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``cli``, ``env``, ``yaml`` or ``default``, with detail."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind

    def where(self) -> str:
        """How an error message names this place: ``file:line``, the variable or the option."""
        if self.kind == "yaml":
            return self.detail
        if self.kind == "env":
            return f"environment variable {self.detail}"
        if self.kind == "cli":
            name = _OPTION_NAMES.get(self.detail, self.detail.rsplit(".", 1)[-1].replace("_", "-"))
            return f"option --{name}"
        return "default"


#: Settings whose command-line option is not named after the key (``agent_count`` -> ``--agents``).
_OPTION_NAMES = {"agent_count": "agents", "cache.dir": "cache", "cache.mode": "cache-mode", "cache.sampled": "cache-sampled"}


DEFAULT = Source("default")


class Settings:
    """The resolved profile and run config, with the source of every value."""

    def __init__(self, profile: ProfileConfig, run: RunConfig, sources: dict[str, Source], files: list[Path]) -> None:
        self.profile = profile
        self.run = run
        self.sources = sources
        self.files = files

    def __repr__(self) -> str:
        return f"Settings(profile={self.profile.name!r}, executor={self.profile.executor!r}, agents={len(self.run.agents)})"

    def source_of(self, key: str) -> Source:
        return self.sources.get(key, DEFAULT)

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain data for config.yaml; secrets replaced by a marker."""

        def plain(value: Any) -> Any:
            if isinstance(value, Secret):
                return REDACTED if redact else value.reveal()
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {"profile": plain(self.profile), **plain(self.run)}

    def rows(self) -> list[tuple[str, Any, Source]]:
        """(dotted key, redacted value, source) for every setting, for ``config show``."""
        out: list[tuple[str, Any, Source]] = []
        data = self.as_dict()
        for key, value in data["profile"].items():
            out.append((f"profile.{key}", value, self.source_of(f"profile.{key}")))
        for key, value in data.items():
            if key == "profile":
                continue
            if key in NESTED:
                for sub, subval in value.items():
                    out.append((f"{key}.{sub}", subval, self.source_of(f"{key}.{sub}")))
            elif key == "agents":
                for agent in value:
                    for sub, subval in agent.items():
                        name = f"agents.{agent['name']}.{sub}"
                        out.append((name, subval, self.source_of(name)))
            else:
                out.append((key, value, self.source_of(key)))
        return out
