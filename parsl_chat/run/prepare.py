"""Before anything is sent: the run directory, the settings, the log (secrets filtered), the resume checks, the cache."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from ..config import CacheConfig, Settings, load_settings
from ..core.agents import AgentSpec
from ..errors import InputError, OutputError
from ..io.ledger import LedgerIndex, digest_matches
from ..io.prompts import Prompt, PromptSource, spool_stdin
from ..io.rundir import read_run_meta
from .options import RunOptions

__all__ = [
    "cache_notes",
    "check_resume",
    "check_writable",
    "clean_previous_driver",
    "new_run_dir",
    "prepare_cache",
    "prepare_dir",
    "resolve_settings",
    "resolved_prompts_path",
    "run_id_for",
    "runs_in_process",
    "setup_logging",
]

log = logging.getLogger("parsl_chat.run")


def run_id_for(run_dir: Path) -> str:
    """The directory's name, made unique when the user chose a plain name like ``--out run``.

    Node-local state (model servers, rate budgets) is keyed by it.
    """
    name = run_dir.name
    if re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", name):
        return name
    return f"{name}-{hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=3).hexdigest()}"


def new_run_dir(base: Path = Path("runs")) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return base / f"{stamp}-{secrets.token_hex(3)}"


def prepare_dir(opts: RunOptions) -> tuple[Path, dict[str, Any]]:
    """The run directory (new or resumed) and, when resuming, its previous run.json."""
    if opts.resume is not None:
        return opts.resume, read_run_meta(opts.resume)
    run_dir = opts.out or new_run_dir()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputError(
            f"{run_dir}: output directory exists and is not empty",
            hint=f"resume it with 'parsl-chat run --resume {run_dir}', or choose another --out",
        )
    return run_dir, {}


def runs_in_process(opts: RunOptions, previous: dict[str, Any]) -> bool:
    """``--no-parsl``/``--parsl`` as given, else what the resumed run chose (a new run: Parsl)."""
    if opts.no_parsl is not None:
        return opts.no_parsl
    return bool(previous.get("options", {}).get("no_parsl", False))


def check_writable(run_dir: Path) -> None:
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{run_dir}: cannot write the run directory: {exc.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < 50 * 1024 * 1024:
        raise OutputError(f"{run_dir}: only {free // (1024 * 1024)} MiB free on this filesystem; need at least 50 MiB")


class _SecretFilter(logging.Filter):
    """Replaces known secret values in every log record (no key in any log file)."""

    def __init__(self, values: list[str]) -> None:
        super().__init__()
        self.values = [v for v in values if v]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.values:
            text = record.getMessage()
            for value in self.values:
                text = text.replace(value, "***")
            record.msg, record.args = text, None
        return True


def setup_logging(run_dir: Path, settings: Settings, debug: bool) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "logs" / "parsl-chat.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_SecretFilter(_secret_values(settings)))
    root = logging.getLogger("parsl_chat")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def _secret_values(settings: Settings) -> list[str]:
    values = [settings.run.api_key.reveal()] if settings.run.api_key else []
    values += [a.api_key.reveal() for a in settings.run.agents if a.api_key]
    return values


def resolve_settings(opts: RunOptions, previous: dict[str, Any]) -> Settings:
    saved = previous.get("options", {})
    profile = opts.profile or saved.get("profile") or "local"
    config_file = opts.config_file or saved.get("config_file")
    cli = {**saved.get("cli", {}), **{k: v for k, v in opts.cli_settings.items() if v is not None}}
    return load_settings(profile, config_file, cli)


def resolved_prompts_path(opts: RunOptions, run_dir: Path, previous: dict[str, Any]) -> Path:
    given = opts.prompts
    if given is None:
        if not previous.get("prompts_file"):
            raise InputError("no prompts file given")
        return Path(previous["prompts_file"])
    if given == "-":
        return spool_stdin(run_dir)
    return Path(given).resolve()


def check_resume(source: PromptSource, index: LedgerIndex, previous: dict[str, Any], agents: list[AgentSpec]) -> list[str]:
    """What changed since the run started: prompts (by content hash) and models."""
    changes = []
    changed = 0
    for item in source.parse():
        if isinstance(item, Prompt):
            found = index.lookup(item.custom_id)
            if found is not None and not digest_matches(found[1], item.digest):
                changed += 1
                if changed <= 5:
                    changes.append(f"{source.path}:{item.line}: prompt {item.custom_id!r} differs from the one already answered")
    if changed > 5:
        changes.append(f"... and {changed - 5} more changed prompts")
    before = {a["name"]: a.get("model") for a in previous.get("agents", [])}
    for agent in agents:
        if agent.name in before and before[agent.name] != agent.model and agent.model != "default":
            changes.append(f"agent {agent.name!r}: model was {before[agent.name]!r}, now {agent.model!r}")
    return changes


def prepare_cache(settings: Settings) -> CacheConfig | None:
    """The run's response cache, its directory checked (and made) before anything is sent; None when off."""
    from ..io.cache import prepare

    return prepare(settings.run.cache, settings.source_of("cache.dir").where())


def cache_notes(cfg: CacheConfig | None, agent_params: dict[str, dict[str, Any]]) -> list[str]:
    from ..io.cache import plan_notes

    return plan_notes(cfg, agent_params)


def clean_previous_driver(previous: dict[str, Any], console: Console) -> None:
    """A driver killed with SIGKILL leaves its Parsl processes and scheduler jobs behind: end them first."""
    from ..backends.cleanup import end_leftovers

    orphans, cancelled = end_leftovers(previous)
    if orphans:
        console.print(f"stopped local Parsl process(es) left by the previous driver: {', '.join(orphans)}")
    if cancelled is not None and cancelled.done:
        done = cancelled.done
        console.print(f"{cancelled.verb} {len(done)} {cancelled.what} left by the previous driver: {', '.join(done)}")
