"""The batch job: read, route, dispatch in chunks, record, summarise.

:func:`execute_run` is what ``parsl-chat run`` does. It is backend-agnostic:
chunks go to Parsl or to an in-process pool through the same interface, and
every finished row goes through the ledger before anything else sees it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from rich.console import Console

from . import __version__
from .agents import AgentSpec, resolve_agents
from .config import Secret, Settings, load_settings, parse_max_failures
from .errors import ConfigError, InputError, OutputError, ParslChatError, RunFailed, RunInterrupted, ServerError, ServerLost
from .executor import Backend, ChunkTask, InProcessBackend, WorkItem, driver_worker_name, iso, unfinished_rows, where_am_i
from .ledger import Ledger, LedgerIndex, digest_matches
from .progress import RunProgress
from .prompts import LineProblem, Prompt, PromptSource, ScanResult, iter_prompts, scan, spool_stdin
from .routing import Router
from .rundir import read_run_meta, write_run_meta
from .supervision import ServerSupervisor

__all__ = ["NODE_LOCAL_ENDPOINT", "RunOptions", "RunOutcome", "execute_run", "new_run_dir"]

log = logging.getLogger("parsl_chat.run")

#: What the end of a run imports (results files, failure count, summary): 0.4-0.5 s the first
#: time, most of it pandas (through pyarrow.dataset and analysis). Loaded while requests run.
_END_MODULES = (f"{__package__}.results", "pyarrow.compute", "pyarrow.dataset", "pandas", f"{__package__}.analysis")

#: agents' endpoint while each node's own model server is not yet known
NODE_LOCAL_ENDPOINT = "node-local://model-server/v1"
CHUNK_RETRIES = 3
#: big prompts (documents, images) close a chunk early: a few chunks in flight stay within memory
CHUNK_MAX_BYTES = 64 << 20


@dataclass
class RunOptions:
    """Everything ``run`` was asked to do, as given on the command line."""

    prompts: str | None
    profile: str | None = None
    config_file: str | None = None
    out: Path | None = None
    resume: Path | None = None
    no_parsl: bool = False
    dry_run: bool = False
    skip_invalid: bool = False
    retry_failed: bool = False
    force: bool = False
    quiet: bool = False
    cli_settings: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    grace_s: float = 15.0


@dataclass
class RunOutcome:
    run_dir: Path
    exit_code: int
    summary: dict[str, Any]
    message: str


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


# --------------------------------------------------------------------------- preparing


class _Stop:
    """Set by signals, the walltime watch and a model server that is gone; read by the dispatch loop.

    Requesting a stop also creates ``stop_file``, which workers read: they start nothing
    new and retry nothing, and hand back what they have not finished.
    """

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.also_touch: list[Path] = []  # other files chunks read as their stop file (a warm start's drain file)
        self.reason: str | None = None
        self.error: ParslChatError | None = None  # a stop that is a failure (a model server lost), said at the end
        self.hard = False

    def __bool__(self) -> bool:
        return self.reason is not None

    def request(self, reason: str, error: ParslChatError | None = None) -> None:
        if self.reason is None:
            self.reason, self.error = reason, error
        for path in (self.stop_file, *self.also_touch):
            try:
                path.touch()
            except OSError:
                pass


def _prepare_dir(opts: RunOptions) -> tuple[Path, dict[str, Any]]:
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


def _check_writable(run_dir: Path) -> None:
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


def _setup_logging(run_dir: Path, settings: Settings, debug: bool) -> logging.Handler:
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


def _resolve_settings(opts: RunOptions, previous: dict[str, Any]) -> Settings:
    saved = previous.get("options", {})
    profile = opts.profile or saved.get("profile") or "local"
    config_file = opts.config_file or saved.get("config_file")
    cli = {**saved.get("cli", {}), **{k: v for k, v in opts.cli_settings.items() if v is not None}}
    return load_settings(profile, config_file, cli)


def _prompts_path(opts: RunOptions, run_dir: Path, previous: dict[str, Any]) -> Path:
    given = opts.prompts
    if given is None:
        if not previous.get("prompts_file"):
            raise InputError("no prompts file given")
        return Path(previous["prompts_file"])
    if given == "-":
        return spool_stdin(run_dir)
    return Path(given).resolve()


def endpoint_and_server(settings: Settings, local_driver: bool) -> tuple[str | None, str, Secret | None, str]:
    """(endpoint, model, api key, how): ``how`` is 'given', 'driver' or 'per-node'."""
    run = settings.run
    model = run.model or run.server.model
    if run.endpoint or (run.agents and all(a.endpoint for a in run.agents)):
        return run.endpoint, run.model or "default", run.api_key, "given"
    if run.server.kind == "none":
        raise ConfigError(
            "no endpoint configured and the model server is disabled (server.kind: none)",
            hint="give --endpoint URL --model NAME, set OPENAI_BASE_URL, or set server.kind to embedded",
        )
    return None, model, run.api_key, "driver" if local_driver else "per-node"


# --------------------------------------------------------------------------- chunking


def chunk_size(agents: list[AgentSpec], slots: list[int], workers: int, total: int, configured: int) -> int:
    if configured > 0:
        return configured
    per_worker = sum(slots)
    size = per_worker * 4  # four rounds of the worker's slots: keeps slots busy, results flowing
    spread = math.ceil(total / (2 * workers)) if total else size  # small runs still use every worker
    return max(1, min(size, spread, 512))


def slots_per_worker(agents: list[AgentSpec], workers: int, in_process: bool) -> list[int]:
    if in_process:  # one process shares each agent's limit across all its chunks
        return [a.concurrency for a in agents]
    return [max(1, round(a.concurrency / workers)) for a in agents]


def _effective_concurrency(
    agents: list[AgentSpec], slots: list[int], workers: int, in_process: bool, console: Console
) -> list[AgentSpec]:
    """Each worker process gets a whole number of slots per agent: say so when that changes the limit."""
    if in_process:
        return agents
    out = []
    for agent, share in zip(agents, slots, strict=True):
        effective = share * workers
        if effective != agent.concurrency:
            message = (
                f"agent {agent.name}: concurrency {agent.concurrency} over {workers} workers is {share} per worker, "
                f"so up to {effective} requests in flight (use a multiple of {workers} to be exact)"
            )
            log.warning(message)
            console.print(f"note: {message}", markup=False, highlight=False)
        out.append(replace(agent, concurrency=effective))
    return out


def _work_items(
    source: PromptSource,
    scanned: ScanResult,
    index: LedgerIndex | None,
    retry_failed: bool,
    force: bool,
    router: Router,
    skipped: list[LineProblem],
) -> Iterator[WorkItem]:
    """Stream work items: single prompts at once, conversations once their last turn is read."""
    open_convs: dict[str, list[dict[str, Any]]] = {}
    for item in iter_prompts(source, skip_lines=scanned.duplicate_lines):
        if isinstance(item, LineProblem):
            skipped.append(item)
            continue
        record = item.to_dict()
        record["digest"] = item.digest
        if item.conversation is not None:
            turns = open_convs.setdefault(item.conversation, [])
            turns.append(record)
            if scanned.conversation_ends.get(item.conversation) != item.line:
                continue
            del open_convs[item.conversation]
            if index is not None and all(_done(index, t["custom_id"], t["digest"], retry_failed, force) for t in turns):
                continue
            pin = next((t["agent"] for t in turns if t.get("agent")), None)
            yield WorkItem(prompts=turns, agent=router.assign(pin))
            continue
        if index is not None and _done(index, item.custom_id, record["digest"], retry_failed, force):
            continue
        yield WorkItem(prompts=[record], agent=router.assign(item.agent))


def _done(index: LedgerIndex, custom_id: str, digest: str, retry_failed: bool, force: bool) -> bool:
    """Whether the ledger already holds this prompt's final row."""
    found = index.lookup(custom_id)
    if found is None:
        return False
    ok, recorded = found
    if force and not digest_matches(recorded, digest):
        return False  # the prompt changed and --force accepted it: answer the new text
    return ok or not retry_failed


def _check_resume(source: PromptSource, index: LedgerIndex, previous: dict[str, Any], agents: list[AgentSpec]) -> list[str]:
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


# --------------------------------------------------------------------------- walltime


def slurm_time_left_s() -> float | None:
    """Seconds left in this SLURM job (22.05 sets no SLURM_JOB_END_TIME: ask squeue)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_slurm_duration(out)


def parse_slurm_duration(text: str) -> float | None:
    """``[D-]HH:MM:SS``, ``MM:SS`` or ``SS`` as seconds; None for UNLIMITED / unparsable."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return float(days * 86400 + h * 3600 + m * 60 + s)


# --------------------------------------------------------------------------- the run


def execute_run(opts: RunOptions, console: Console, debug: bool = False) -> RunOutcome:
    run_dir, previous = _prepare_dir(opts)
    if not opts.dry_run:
        _check_writable(run_dir)
    settings = _resolve_settings(opts, previous)
    prompts_path = _prompts_path(opts, run_dir, previous)
    source = PromptSource(prompts_path, max_line_bytes=settings.run.limits.max_line_bytes)
    scanned = scan(source)
    if not scanned.ok and not opts.skip_invalid:
        raise InputError(
            f"{prompts_path}: {scanned.problem_count} bad line(s); nothing was sent",
            [str(p) for p in scanned.problems],
            hint="fix them (parsl-chat validate lists every one) or run with --skip-invalid to record them as errors",
        )

    local_driver = opts.no_parsl or settings.profile.executor == "local"
    endpoint, model, api_key, how = endpoint_and_server(settings, local_driver)
    agents = resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key)
    router = Router(agents, settings.run.routing)
    unknown = router.unknown_pins(list(scanned.pinned_agents))
    if unknown:
        name = unknown[0]
        raise InputError(
            f"{prompts_path}:{scanned.pinned_agents[name]}: field 'agent': unknown agent {name!r}; "
            f"agents of this run: {', '.join(router.names)}"
        )

    from .profiles import total_workers

    workers = settings.profile.workers if opts.no_parsl else total_workers(settings.profile)
    if opts.dry_run:
        return _dry_run(console, settings, agents, scanned, workers, opts, how, run_dir)

    handler = _setup_logging(run_dir, settings, debug)
    try:
        return _run(opts, console, settings, run_dir, previous, source, scanned, agents, router, workers, how, opts.no_parsl)
    finally:
        logging.getLogger("parsl_chat").removeHandler(handler)
        handler.close()


def _dry_run(
    console: Console,
    settings: Settings,
    agents: list[AgentSpec],
    scanned: ScanResult,
    workers: int,
    opts: RunOptions,
    how: str,
    run_dir: Path,
) -> RunOutcome:
    from .profiles import plan_lines

    lines = [f"prompts: {scanned.valid} valid" + (f", {scanned.problem_count} bad (skipped)" if scanned.problem_count else "")]
    lines += ["backend: in-process (--no-parsl)" if opts.no_parsl else "backend: Parsl HighThroughputExecutor"]
    lines += plan_lines(settings.profile) if not opts.no_parsl else [f"workers: {settings.profile.workers} threads"]
    server = {
        "given": "endpoints as configured",
        "driver": f"model server: {settings.run.server.kind} ({settings.run.server.model}) started on this machine",
        "per-node": f"model server: {settings.run.server.kind} ({settings.run.server.model}) started on each node",
    }[how]
    lines.append(server)
    lines += fleet_lines(settings.run.routing, agents, how)
    lines.append(f"output: {run_dir}")
    console.print("\n".join(lines), markup=False, highlight=False)
    return RunOutcome(run_dir, 0, {}, "dry run: nothing sent")


def fleet_lines(routing: str, agents: list[AgentSpec], how: str) -> list[str]:
    """The resolved fleet, one line per agent (``--dry-run`` and ``config show``); keys are never shown."""
    lines = [f"routing: {routing}; {len(agents)} agents, {sum(a.concurrency for a in agents)} requests in flight at most"]
    for agent in agents:
        endpoint = agent.endpoint
        if agent.endpoint == NODE_LOCAL_ENDPOINT:
            endpoint = "the embedded model server" if how == "driver" else "each node's model server"
        key = ", API key set" if agent.api_key else ""
        lines.append(
            f"  agent {agent.name}: model {agent.model}, {endpoint}, concurrency {agent.concurrency}, "
            f"weight {agent.weight:g}{key}"
        )
    return lines


def describe_fleet(settings: Settings) -> list[str]:
    """:func:`fleet_lines` for ``settings`` as a run would resolve them (``--agents N`` cycling included)."""
    endpoint, model, api_key, how = endpoint_and_server(settings, settings.profile.executor == "local")
    return fleet_lines(settings.run.routing, resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key), how)


def _run(
    opts: RunOptions,
    console: Console,
    settings: Settings,
    run_dir: Path,
    previous: dict[str, Any],
    source: PromptSource,
    scanned: ScanResult,
    agents: list[AgentSpec],
    router: Router,
    workers: int,
    how: str,
    in_process: bool,
) -> RunOutcome:
    from .profiles import ParslBackend

    run_id = previous.get("run_id") or run_id_for(run_dir)
    # blocks of earlier drivers of this run are over (finished, or cancelled below)
    earlier = [{**b, "ended_at": b.get("ended_at") or iso(time.time())} for b in previous.get("blocks", [])]
    ledger_path = run_dir / "ledger.jsonl"
    index = LedgerIndex.load(ledger_path) if opts.resume is not None else None
    if index is not None:
        changes = _check_resume(source, index, previous, agents)
        if changes and not opts.force:
            raise InputError(
                f"{run_dir}: the prompts or models changed since this run started; nothing was sent",
                changes,
                hint="resume with the original prompts file and config, or add --force to answer the changed prompts anew",
            )
        _clean_previous_driver(previous, console)

    slots = slots_per_worker(agents, workers, in_process)
    agents = _effective_concurrency(agents, slots, workers, in_process, console)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings.as_dict(redact=True), sort_keys=False))
    stop_file = run_dir / ".stop"
    stop_file.unlink(missing_ok=True)
    meta: dict[str, Any] = {
        "run_id": run_id,
        "version": __version__,
        "command": opts.argv,
        "prompts_file": str(source.path),
        "started_at": previous.get("started_at") or iso(time.time()),
        "resumed_at": [*previous.get("resumed_at", []), iso(time.time())] if previous else [],
        "finished_at": None,
        "status": "running",
        "executor": "in-process" if in_process else settings.profile.executor,
        "profile": settings.profile.name,
        "workers": workers,
        "agent_slots": sum(a.concurrency for a in agents),
        # this driver's own process, where in-process chunks run: it holds every agent slot
        "driver_workers": [*previous.get("driver_workers", []), driver_worker_name(where_am_i()["node"] or "")],
        "agents": [a.describe() for a in agents],
        "routing": router.policy,
        "blocks": earlier,
        "cost": {k: v for k, v in vars(settings.run.cost).items() if v is not None} or None,
        "options": {
            "profile": opts.profile or previous.get("options", {}).get("profile") or "local",
            "config_file": str(Path(opts.config_file).resolve())
            if opts.config_file
            else previous.get("options", {}).get("config_file"),
            "cli": {
                **previous.get("options", {}).get("cli", {}),
                **{k: v for k, v in opts.cli_settings.items() if v is not None},
            },
        },
    }
    write_run_meta(run_dir, meta)

    stop = _Stop(stop_file)
    preload = _Preload(_END_MODULES)
    previous_handlers = _install_signals(stop)
    server = None
    supervisor: ServerSupervisor | None = None
    #: what every chunk carries: where the driver's server is, where crash logs go, which driver this is
    task_extra: dict[str, Any] = {
        "node_endpoint_placeholder": NODE_LOCAL_ENDPOINT,
        "log_dir": str((run_dir / "logs").resolve()),
        "driver_session": secrets.token_hex(4),
    }
    backend: Backend | None = None
    ledger = Ledger(ledger_path).open()
    skipped: list[LineProblem] = []
    node_server_cfg = None

    def end_backend() -> None:
        """Shut the backend down (Parsl: its blocks too), note when the blocks ended, stop the driver's model server."""
        try:
            if backend is not None:
                _update_blocks(meta, earlier, backend, run_dir)
                backend.shutdown()
                _update_blocks(meta, earlier, backend, run_dir)
        finally:
            if server is not None:
                server.stop()
            stop_file.unlink(missing_ok=True)

    try:
        if how == "driver":
            from .server import ModelServer

            server = ModelServer(settings.run.server, log_path=run_dir / "logs" / "model-server.log")
            console.print(f"starting the embedded model server ({settings.run.server.model}) ...", style="dim")
            url = server.start()
            supervisor = ServerSupervisor(server, run_dir / "logs", settings.run.server.max_restarts)
            task_extra.update(driver_server=url, driver_server_wait_s=settings.run.server.ready_timeout_s + 30.0)
            agents = [replace(a, endpoint=url) if a.endpoint == NODE_LOCAL_ENDPOINT else a for a in agents]
            meta["agents"] = [a.describe() for a in agents]
        elif how == "per-node":
            node_server_cfg = settings.run.server

        backend = (
            InProcessBackend(settings.profile.workers)
            if in_process
            else ParslBackend(settings.profile, run_id, run_dir / "logs" / "parsl")
        )
        if isinstance(backend, ParslBackend) and settings.profile.executor == "local" and settings.profile.warm_start:
            backend = WarmStartBackend(backend, settings.profile.workers, run_dir / ".warm-start-drain")
            stop.also_touch.append(backend.drain_file)  # the chunks running in this process stop too
        backend.start()
        if not in_process and settings.profile.executor == "kubernetes":
            from .kube import cluster_record

            # how `cleanup` reaches this cluster later, whatever the environment then
            meta["kubernetes"] = previous.get("kubernetes") or cluster_record(settings.profile, run_id)
        _update_blocks(meta, earlier, backend, run_dir)  # the interchange's pid, before anything can kill us
        deadline = _walltime_deadline()
        total = scanned.valid - (len(index) if index is not None else 0)
        if index is not None and opts.retry_failed:
            total += index.failed
        size = chunk_size(agents, slots, workers, max(total, 0), settings.run.limits.chunk_size)
        log.info("run %s: %d agents, %d workers, chunk size %d, backend %r", run_id, len(agents), workers, size, backend)
        with RunProgress(max(total, 0), console=console, quiet=opts.quiet) as progress:
            _dispatch(
                backend=backend,
                items=_work_items(source, scanned, index, opts.retry_failed, opts.force, router, skipped),
                make_task=lambda cid, items: ChunkTask(
                    run_id=run_id,
                    chunk_id=cid,
                    agents=agents,
                    slots=slots,
                    limits=settings.run.limits,
                    items=items,
                    stop_file=str(stop_file),
                    node_server=node_server_cfg,
                    extra=task_extra,
                ),
                chunk_size=size,
                in_flight=max(2, 2 * workers),
                ledger=ledger,
                progress=progress,
                stop=stop,
                stop_file=stop_file,
                deadline=deadline,
                grace_s=opts.grace_s,
                on_tick=lambda: _update_blocks(meta, earlier, backend, run_dir),
                on_turn=lambda: _on_turn(preload, supervisor),
            )
        if skipped:
            ledger.append(_invalid_rows(skipped, agents))
    except KeyboardInterrupt:
        stop.reason = stop.reason or "interrupted"
        stop.hard = True
    except BaseException:
        _close_ledger(ledger)
        end_backend()
        raise

    # Every row is in the ledger once dispatch returns: close it, then write the results files
    # while the backend shuts down in another thread (Parsl's cleanup: 0.05-0.5 s on one machine,
    # more where SLURM blocks are cancelled or a warm start's Parsl is still starting). Its errors
    # are raised again by result().
    _close_ledger(ledger)
    shutting_down = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parsl-chat-shutdown")
    ending = shutting_down.submit(end_backend)
    shutting_down.shutdown(wait=False)  # no more work for it; result() below waits for this one
    # Signals stay handled until the results and summary are written: a batch job's warning
    # that arrives now (seen: during Parsl's shutdown) must not kill the driver mid-write.
    try:
        try:
            preload.wait()
            count = write_results(run_dir)
        except OSError as exc:
            raise _cannot_write(run_dir, exc, stop) from None
        finally:
            ending.result()  # run.json and the summary need the blocks' ended_at
        meta["finished_at"] = iso(time.time())
        try:
            failed = _failed_count(run_dir)
            prompts = scanned.valid + len(skipped)
            max_count, max_share = parse_max_failures(settings.run.max_failures)
            allowed = max_count if max_count is not None else math.floor((max_share or 0) * prompts)
            interrupted = bool(stop) and count < prompts  # a stop after the last answer leaves nothing to resume
            meta["status"] = "interrupted" if interrupted else "failed" if failed > allowed else "complete"
            meta["unfinished"] = prompts - count if interrupted else 0  # not failed: the resume sends them
            meta["stop_reason"] = stop.reason
            summary = _write_summary(run_dir, meta)  # once, with the final status: it reads every row
        except OSError as exc:
            raise _cannot_write(run_dir, exc, stop) from None
    finally:
        _restore_signals(previous_handlers)
    if interrupted:
        resume = f"parsl-chat run --resume {run_dir}"
        raise RunInterrupted(
            f"run stopped ({stop.reason}) with {count} of {prompts} prompts recorded in {run_dir}; "
            f"{prompts - count} unfinished (not failed: the resume sends them)",
            stop.error.problems if stop.error is not None else None,
            hint=f"finish it with: {resume}",
        )
    message = f"{count} prompts, {count - failed} ok, {failed} failed; results in {run_dir}"
    if failed > allowed:
        by_type = summary.get("counts", {}).get("errors_by_type", {})
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(by_type.items()))
        # the first message of each kind says what went wrong (an endpoint down, a bad key) without opening a file
        examples = [f"{e['error_type']}: {e['example']}" for e in summary.get("errors", []) if e.get("example")]
        raise RunFailed(
            f"{failed} of {count} prompts failed ({detail}); --max-failures allows {allowed}; results in {run_dir}",
            examples,
            hint=f"see the 'error' column of {run_dir / 'results.csv'}; "
            f"re-send the failed ones with: parsl-chat run --resume {run_dir} --retry-failed",
        )
    return RunOutcome(run_dir, 0, summary, message)


def _on_turn(preload: _Preload, supervisor: ServerSupervisor | None) -> None:
    """Every turn of the dispatch loop: the driver's model server kept up, the end's imports started when idle."""
    if supervisor is not None:
        supervisor.check()
    preload.start_if_idle()


def write_results(run_dir: Path) -> int:
    """:func:`parsl_chat.results.write_results`, imported when first needed: pyarrow stays off the start of a run."""
    from .results import write_results as write

    return write(run_dir)


class _Preload:
    """Imports modules in a daemon thread, while the driver has CPU to spare: what the end of the run needs.

    The driver is mostly idle while requests run (Parsl's workers, or in-process requests waiting
    on the endpoint), and then the imports come free. Where it is busy (in-process requests to a
    fast endpoint) they would only slow the requests, by more than they save at the end (measured:
    +0.38 s wall, +0.16 s CPU on 2,000 prompts at 0 ms), so the end pays for them as before.
    """

    IDLE_SHARE = 0.25  #: of one core, over WINDOW_S at least
    WINDOW_S = 0.5

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._thread: threading.Thread | None = None
        self._since: tuple[float, float] | None = None  # (wall, this process's CPU) when measuring began

    def start_if_idle(self) -> None:
        """Called as dispatch turns: starts the imports once the driver used under IDLE_SHARE of a core."""
        if self._thread is not None:
            return
        now = (time.monotonic(), time.process_time())
        if self._since is None or now[0] - self._since[0] < self.WINDOW_S:
            self._since = self._since or now
            return
        busy = (now[1] - self._since[1]) / (now[0] - self._since[0])
        self._since = now
        if busy < self.IDLE_SHARE:
            self._thread = threading.Thread(target=self._load, name="parsl-chat-preload", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception:  # imported again where it is needed, and reported there
                log.debug("preloading %s failed", name, exc_info=True)

    def wait(self) -> None:
        """Call before importing any of the modules: two threads importing pandas and pyarrow at once can
        meet in their circular imports (pandas imports pyarrow, pyarrow.dataset imports pandas)."""
        if self._thread is not None:
            self._thread.join()


def _close_ledger(ledger: Ledger) -> None:
    try:
        ledger.close()
    except OSError:
        pass  # the failed write is reported by the results; complete lines are already on disk


def _cannot_write(run_dir: Path, exc: OSError, stop: _Stop) -> RunInterrupted:
    return RunInterrupted(
        f"cannot write the results in {run_dir}: {exc.strerror} ({stop.reason or 'after the last prompt'}); "
        "every answer recorded so far is in ledger.jsonl",
        hint=f"free space (or raise the quota), then finish with: parsl-chat run --resume {run_dir}",
    )


def _clean_previous_driver(previous: dict[str, Any], console: Console) -> None:
    """A driver killed with SIGKILL leaves its Parsl processes and scheduler jobs behind: end them first."""
    from .cleanup import kill_orphans
    from .profiles import cancel_slurm_jobs

    orphans = kill_orphans(previous)
    if orphans:
        console.print(f"stopped local Parsl process(es) left by the previous driver: {', '.join(orphans)}")
    if previous.get("executor") == "kubernetes":
        from .kube import delete_run_pods

        deleted = delete_run_pods(previous)
        if deleted:
            console.print(f"deleted {len(deleted)} pod(s) left by the previous driver: {', '.join(deleted)}")
    stale = [b["job_id"] for b in previous.get("blocks", []) if b.get("job_id")]
    if stale and previous.get("executor") == "slurm":
        cancelled = cancel_slurm_jobs(stale)
        if cancelled:
            console.print(f"cancelled {len(cancelled)} SLURM job(s) left by the previous driver: {', '.join(cancelled)}")


def _failed_count(run_dir: Path) -> int:
    """Rows not ok in results.parquet, read from its one 'status' column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    status = pq.read_table(run_dir / "results.parquet", columns=["status"])["status"]
    return len(status) - int(pc.sum(pc.equal(status, "ok")).as_py() or 0)


def _write_summary(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from .analysis import write_summary

    write_run_meta(run_dir, meta)
    summary: dict[str, Any] = json.loads(write_summary(run_dir).read_text(encoding="utf-8"))
    return summary


def _update_blocks(meta: dict[str, Any], earlier: list[dict[str, Any]], backend: Backend | None, run_dir: Path) -> None:
    """Keep run.json's block list current: a later ``cleanup`` needs the job ids after a crash."""
    if backend is None:
        return
    blocks = earlier + backend.blocks()
    processes: list[dict[str, Any]] = getattr(backend, "processes", list)()
    if blocks != meta["blocks"] or processes != meta.get("processes"):
        meta["blocks"] = blocks
        meta["processes"] = processes
        write_run_meta(run_dir, meta)


def _invalid_rows(problems: list[LineProblem], agents: list[AgentSpec]) -> list[dict[str, Any]]:
    now = iso(time.time())
    return [
        {
            "custom_id": p.custom_id or f"line-{p.line}",
            "line": p.line,
            "agent": None,
            "status": "error",
            "error_type": "invalid_input",
            "error": p.message,
            "attempts": 0,
            "submitted_at": now,
        }
        for p in problems
    ]


def _walltime_deadline() -> float | None:
    """Monotonic time by which dispatch must stop to exit cleanly inside a SLURM job."""
    left = slurm_time_left_s()
    if left is None:
        return None
    given = os.environ.get("PARSL_CHAT_WALLTIME_MARGIN_S")
    # default: stop 5 % before the end, at least 30 s, but never in the first half of the job
    margin = float(given) if given else min(max(30.0, 0.05 * left), 0.5 * left)
    log.info(
        "inside SLURM job %s: %.0f s left, stopping dispatch %.0f s before the end", os.environ.get("SLURM_JOB_ID"), left, margin
    )
    return time.monotonic() + left - margin


def _dispatch(
    *,
    backend: Backend,
    items: Iterator[WorkItem],
    make_task: Any,
    chunk_size: int,
    in_flight: int,
    ledger: Ledger,
    progress: RunProgress,
    stop: _Stop,
    stop_file: Path,
    deadline: float | None,
    grace_s: float,
    on_tick: Any,
    on_turn: Callable[[], None] | None = None,
) -> None:
    """Keep ``in_flight`` chunks submitted; record each chunk's rows as it returns.

    ``on_turn`` is called on every turn of the loop once chunks are out, before waiting for results.
    """
    pending: dict[Future[list[dict[str, Any]]], tuple[ChunkTask, int]] = {}
    chunk_id = 0
    exhausted = False
    last_tick = 0.0
    note_rows = getattr(backend, "note_rows", None)
    all_submitted = getattr(backend, "all_submitted", None)  # the warm start's: Parsl may not be needed at all

    def submit(task: ChunkTask, tries: int) -> None:
        now = time.time()
        for item in task.items:
            item.submitted_at = item.submitted_at or now
        pending[backend.submit(task)] = (task, tries)

    # one item read ahead, so that the last chunk is known to be the last as it is sent
    upcoming = next(items, None)

    def take_chunk() -> list[WorkItem]:
        nonlocal upcoming
        batch: list[WorkItem] = []
        size = payload = 0
        while upcoming is not None and size < chunk_size and payload < CHUNK_MAX_BYTES:
            batch.append(upcoming)
            size += len(upcoming.prompts)
            payload += sum(p.get("line_bytes", 0) for p in upcoming.prompts)
            upcoming = next(items, None)
        return batch

    grace_until: float | None = None
    while True:
        if deadline is not None and not stop and time.monotonic() >= deadline:
            stop.request("walltime")
        if stop and grace_until is None:
            grace_until = time.monotonic() + grace_s
            log.warning("stopping (%s): no new chunks, waiting up to %.0f s for %d in flight", stop.reason, grace_s, len(pending))
        while not stop and not exhausted and len(pending) < in_flight:
            batch = take_chunk()
            if batch:
                submit(make_task(chunk_id, batch), 0)
                chunk_id += 1
            if upcoming is None:
                exhausted = True
                if all_submitted is not None:
                    all_submitted()
        if not pending:
            return
        if on_turn is not None:
            try:
                on_turn()
            except ServerLost as exc:  # the driver's model server died once too often
                stop.request(str(exc).partition("\n")[0], exc)
                continue
        timeout = 1.0 if grace_until is None else max(0.0, min(1.0, grace_until - time.monotonic()))
        done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            task, tries = pending.pop(future)
            try:
                rows = future.result()
            except ServerLost as exc:  # a node's server cannot be restarted: stop, the resume sends the chunk
                stop.request(str(exc).partition("\n")[0], exc)
                continue
            except ServerError:
                raise  # a node's model server cannot start: retrying elsewhere would fail alike
            except Exception as exc:  # a worker or block died: the chunk's rows never arrived
                if tries + 1 < CHUNK_RETRIES and not stop:
                    log.warning("chunk %d lost (%s: %s); sending it again", task.chunk_id, type(exc).__name__, exc)
                    submit(task, tries + 1)
                    continue
                if stop:
                    continue  # not recorded, so a resume sends it again
                rows = _lost_rows(task, exc)
            rows, cut_short = unfinished_rows(rows)
            _note_server_down(cut_short, stop)
            if not stop and len(rows) < sum(len(item.prompts) for item in task.items):
                # a drained chunk (warm start handing over to Parsl), or prompts given back: send them again
                done_ids = {row["custom_id"] for row in rows}
                rest = [item for item in task.items if not all(p["custom_id"] in done_ids for p in item.prompts)]
                if rest:
                    submit(replace(task, items=rest), tries)
            try:
                ledger.append(rows)
            except OSError as exc:  # disk full, quota, file size limit: stop, keep what is recorded
                stop.reason = f"cannot write {ledger.path}: {exc.strerror}"
                stop.hard = True
                return
            if note_rows is not None:
                note_rows(rows)
            failed = sum(1 for r in rows if r["status"] != "ok")
            progress.add(len(rows) - failed, failed)
        if time.monotonic() - last_tick > 2.0:
            last_tick = time.monotonic()
            on_tick()
        if grace_until is not None and (time.monotonic() >= grace_until or stop.hard):
            log.warning("grace period over: %d chunk(s) still in flight are left for the resume", len(pending))
            return


def _note_server_down(cut_short: list[dict[str, Any]], stop: _Stop) -> None:
    """A model server that is gone (restarts used up, or never back): stop the run, to be resumed."""
    down = next((row for row in cut_short if row.get("error_type") == "server_down"), None)
    if down is not None:
        message = str(down.get("error") or "a model server is gone")
        first, _, rest = message.partition("\n")
        stop.request(first, ServerLost(first, rest.splitlines()))
    elif cut_short:
        log.info("%d prompt(s) cut short by the stop or the hand-over were given back", len(cut_short))


def _lost_rows(task: ChunkTask, exc: BaseException) -> list[dict[str, Any]]:
    now = iso(time.time())
    rows = []
    for item in task.items:
        for prompt in item.prompts:
            rows.append(
                {
                    "custom_id": prompt["custom_id"],
                    "line": prompt["line"],
                    "conversation": prompt.get("conversation"),
                    "turn": prompt.get("turn"),
                    "status": "error",
                    "error_type": "other",
                    "error": f"worker lost {CHUNK_RETRIES} times: {type(exc).__name__}: {exc}"[:500],
                    "attempts": 0,
                    "submitted_at": iso(item.submitted_at),
                    "finished_at": now,
                    "digest": prompt.get("digest"),
                }
            )
    return rows


# --------------------------------------------------------------------------- warm start


class WarmStartBackend:
    """Parsl on this machine, with the first chunks run in this process while Parsl starts.

    HTEX needs seconds before a worker runs anything (interchange, worker pool and worker
    imports). Until a warm-up task has come back from a worker, chunks run in-process with
    each agent's whole concurrency; then those chunks are drained (a file their slots check:
    no new request, requests in flight finish), their unstarted items are sent again to Parsl
    by the dispatcher, and only once the in-process requests are over do chunks go to Parsl,
    so an agent's concurrency limit holds throughout. A run that ends before the hand-over
    stops Parsl as soon as Parsl's own start is over, without waiting for its workers; so
    does one whose every chunk was sent before the hand-over (:meth:`all_submitted`).
    """

    def __init__(self, parsl: Any, threads: int, drain_file: Path) -> None:
        self.parsl = parsl
        self.label = parsl.label
        self.workers = parsl.workers
        self.local = InProcessBackend(threads)
        self.drain_file = drain_file
        self._ready = threading.Event()  # Parsl's workers can take over (or Parsl failed, or the run ended)
        self._wake = threading.Event()  # a warm-up task came back, or the run is ending
        self._error: BaseException | None = None
        self._local: set[Future[list[dict[str, Any]]]] = set()
        self._handed_over = False
        self._parsl_stopping: Future[None] | None = None  # set once every chunk stays in this process
        self.handover_s: float | None = None

    def __repr__(self) -> str:
        return f"WarmStartBackend({self.parsl!r})"

    def __getattr__(self, name: str) -> Any:  # processes(), note_rows(), executor: Parsl's
        return getattr(self.parsl, name)

    def blocks(self) -> list[dict[str, Any]]:
        """The driver's own share (the in-process chunks ran there), then Parsl's blocks."""
        return self.local.blocks() + self.parsl.blocks()

    def start(self) -> None:
        self.drain_file.unlink(missing_ok=True)
        self.local.start()
        started = time.monotonic()

        def boot() -> None:
            try:
                self.parsl.start()
                if not self._wake.is_set():
                    for future in self.parsl.warm_up():
                        future.add_done_callback(lambda _: self._wake.set())
                    self._wake.wait()
            except BaseException as exc:  # reported by the next submit()
                self._error = exc
            self.handover_s = time.monotonic() - started
            self._ready.set()

        threading.Thread(target=boot, name="parsl-chat-warm-start", daemon=True).start()

    def submit(self, task: ChunkTask) -> Future[list[dict[str, Any]]]:
        if not self._ready.is_set() or self._parsl_stopping is not None:
            local = replace(task, slots=[a.concurrency for a in task.agents], stop_file=str(self.drain_file))
            future = self.local.submit(local)
            self._local.add(future)
            future.add_done_callback(self._local.discard)
            return future
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if not self._handed_over:
            self.drain_file.touch()
            wait(list(self._local))  # requests in flight here end before Parsl's workers start theirs
            self._handed_over = True
            log.info("warm start: Parsl workers took over after %.1f s", self.handover_s or 0.0)
        return self.parsl.submit(task)

    def all_submitted(self) -> None:
        """The dispatcher has nothing more to send (a chunk sent again still comes here).

        Before the hand-over every chunk is in this process already, and Parsl's workers
        would start (imports in four processes: seconds of CPU that a model server on
        the same cores needs) only to be stopped at the end: stop Parsl now, in the background.
        """
        if self._handed_over or self._parsl_stopping is not None:
            return
        log.info("warm start: every chunk runs in this process; stopping Parsl's start")
        self._wake.set()  # no waiting for a warm-up task
        stopping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parsl-chat-parsl-stop")
        self._parsl_stopping = stopping.submit(self._stop_parsl)
        stopping.shutdown(wait=False)

    def _stop_parsl(self) -> None:
        # no waiting for Parsl's workers to come up (seconds), only for Parsl's own start,
        # so that its cleanup finds all it started: never leave a half-started Parsl behind
        self._ready.wait(timeout=60)
        self.parsl.shutdown()  # cancels the block being started (worker pool) and ends the interchange

    def shutdown(self) -> None:
        self.drain_file.touch()
        self.local.shutdown()
        if self._parsl_stopping is not None:
            self._parsl_stopping.result()
        else:
            if not self._handed_over:
                log.info("warm start: the run ended before Parsl's workers took over; stopping Parsl")
                self._wake.set()
            self._stop_parsl()
        self.drain_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- signals


def _install_signals(stop: _Stop) -> dict[int, Any]:
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop and signum == signal.SIGINT:
            stop.hard = True  # a second Ctrl-C: stop now (the ledger is flushed per chunk)
            raise KeyboardInterrupt
        stop.request(name)
        if signum == signal.SIGHUP:
            _detach_from_terminal()
            return
        print(
            f"\nparsl-chat: {name} received: finishing requests in flight, then stopping (Ctrl-C again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    # SIGHUP: the terminal went away (an SSH session dropped). By default it killed the driver at
    # once, leaving run.json 'running' and the interchange (in its own session) behind.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. tests calling in a thread)
            pass
    return previous


def _detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null where they were a terminal that has hung up.

    Writes to a hung-up terminal fail (EIO), and the progress display, the end-of-run
    message and the error path all write; the run itself goes on to a clean stop.
    Files and pipes (a batch job's output) are kept.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal (isatty() fails on one that hung up)
                    os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
