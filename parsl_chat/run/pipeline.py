"""The batch job as named stages: prepare, record the start, start the backend, dispatch, finish, verdict.

:func:`execute_run` is what ``parsl-chat run`` does. It is backend-agnostic:
chunks go to Parsl or to an in-process pool through the same interface, and
every finished row goes through the ledger before anything else sees it.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console

from .. import __version__
from .._signals import restore_handlers
from ..backends import Backend
from ..backends.inprocess import InProcessBackend
from ..backends.targets import model_servers, target_for
from ..backends.warmstart import WarmStartBackend
from ..config import CacheConfig, ServerConfig, Settings, parse_max_failures
from ..core.agents import AgentSpec, resolve_agents
from ..core.routing import Router
from ..core.structured import output_meta
from ..errors import InputError, RunFailed, RunInterrupted
from ..io.ledger import Ledger, LedgerIndex
from ..io.prompts import LineProblem, PromptSource, ScanResult, scan
from ..io.rundir import write_run_meta
from ..progress import RunProgress
from ..serve.supervision import ServerSupervisor
from ..worker.executor import ChunkTask, WorkItem, driver_worker_name, iso, where_am_i
from .dispatch import dispatch_chunks, invalid_rows
from .finish import (
    END_MODULES,
    Preload,
    cannot_write,
    close_ledger,
    every_turn,
    failed_count,
    update_run_blocks,
    write_results,
    write_run_summary,
)
from .options import RunOptions, RunOutcome
from .plan import (
    NODE_LOCAL_ENDPOINT,
    chunk_size,
    dry_run,
    effective_concurrency,
    endpoint_and_server,
    slots_per_worker,
    work_items,
)
from .prepare import (
    cache_notes,
    check_resume,
    check_writable,
    clean_previous_driver,
    prepare_cache,
    prepare_dir,
    resolve_settings,
    resolved_prompts_path,
    run_id_for,
    runs_in_process,
    setup_logging,
)
from .stopping import StopState, install_signals, walltime_deadline

if TYPE_CHECKING:
    from ..serve.server import ModelServer

__all__ = ["execute_run"]

log = logging.getLogger("parsl_chat.run")


def execute_run(opts: RunOptions, console: Console, debug: bool = False) -> RunOutcome:
    run_dir, previous = prepare_dir(opts)
    opts = replace(opts, no_parsl=runs_in_process(opts, previous))
    if not opts.dry_run:
        check_writable(run_dir)
    settings = resolve_settings(opts, previous)
    prompts_path = resolved_prompts_path(opts, run_dir, previous)
    source = PromptSource(prompts_path, max_line_bytes=settings.run.limits.max_line_bytes)
    scanned = scan(source)
    if not scanned.ok and not opts.skip_invalid:
        raise InputError(
            f"{prompts_path}: {scanned.problem_count} bad line(s); nothing was sent",
            [str(p) for p in scanned.problems],
            hint="fix them (parsl-chat validate lists every one) or run with --skip-invalid to record them as errors",
        )

    local_driver = opts.no_parsl or target_for(settings.profile).workers_on_driver
    endpoint, model, api_key, how = endpoint_and_server(settings, local_driver)
    agents = resolve_agents(settings, endpoint or NODE_LOCAL_ENDPOINT, model, api_key, model_servers(settings.profile))
    router = Router(agents, settings.run.routing)
    unknown = router.unknown_pins(list(scanned.pinned_agents))
    if unknown:
        name = unknown[0]
        raise InputError(
            f"{prompts_path}:{scanned.pinned_agents[name]}: field 'agent': unknown agent {name!r}; "
            f"agents of this run: {', '.join(router.names)}"
        )

    from ..backends.profiles import total_workers

    workers = settings.profile.workers if opts.no_parsl else total_workers(settings.profile)
    if opts.dry_run:
        return dry_run(console, settings, agents, scanned, opts, how, run_dir)

    handler = setup_logging(run_dir, settings, debug)
    try:
        run = _Run(opts, console, settings, run_dir, previous, source, scanned, agents, router, workers, how, bool(opts.no_parsl))
        return _run(run)
    finally:
        logging.getLogger("parsl_chat").removeHandler(handler)
        handler.close()


@dataclass
class _Run:
    """One run as its stages fill it in: what was prepared, then what was started."""

    opts: RunOptions
    console: Console
    settings: Settings
    run_dir: Path
    previous: dict[str, Any]  # the resumed run's run.json ({} for a new run)
    source: PromptSource
    scanned: ScanResult
    agents: list[AgentSpec]
    router: Router
    workers: int
    how: str  # where the model server runs: 'given', 'driver' or 'per-node'
    in_process: bool
    run_id: str = ""
    earlier: list[dict[str, Any]] = field(default_factory=list)  # blocks of earlier drivers of this run
    index: LedgerIndex | None = None  # what the ledger holds, when resuming
    slots: list[int] = field(default_factory=list)  # per agent, in each worker
    cache: CacheConfig | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # run.json
    stop: StopState = field(init=False)
    server: ModelServer | None = None  # the driver's own model server
    supervisor: ServerSupervisor | None = None
    backend: Backend | None = None
    node_server: ServerConfig | None = None  # what each node starts, when per-node
    #: what every chunk carries: where the driver's server is, where crash logs go, which driver this is
    task_extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[LineProblem] = field(default_factory=list)  # bad lines, recorded as errors at the end

    @property
    def stop_file(self) -> Path:
        return self.run_dir / ".stop"

    def update_blocks(self) -> None:
        update_run_blocks(self.meta, self.earlier, self.backend, self.run_dir)

    def end_backend(self) -> None:
        """Shut the backend down (Parsl: its blocks too), note when the blocks ended, stop the driver's model server."""
        try:
            if self.backend is not None:
                self.update_blocks()
                self.backend.shutdown()
                self.update_blocks()
        finally:
            if self.server is not None:
                self.server.stop()
            self.stop_file.unlink(missing_ok=True)


def _run(run: _Run) -> RunOutcome:
    _check_resumed(run)
    _record_start(run)
    run.stop = StopState(run.stop_file)
    preload = Preload(END_MODULES)
    previous_handlers = install_signals(run.stop)
    ledger = Ledger(run.run_dir / "ledger.jsonl").open()
    try:
        _start_backend(run)
        _dispatch_all(run, ledger, preload)
        if run.skipped:
            ledger.append(invalid_rows(run.skipped))
    except KeyboardInterrupt:
        run.stop.reason = run.stop.reason or "interrupted"
        run.stop.hard = True
    except BaseException:
        close_ledger(ledger)
        run.end_backend()
        raise
    try:
        count, failed, allowed, summary = _finish(run, ledger, preload)
    finally:
        restore_handlers(previous_handlers)
    return _verdict(run, count, failed, allowed, summary)


def _check_resumed(run: _Run) -> None:
    """A resume goes on only with the prompts and models it began with (or --force); the previous driver's leftovers end."""
    opts, previous = run.opts, run.previous
    run.run_id = previous.get("run_id") or run_id_for(run.run_dir)
    # blocks of earlier drivers of this run are over (finished, or cancelled below)
    run.earlier = [{**b, "ended_at": b.get("ended_at") or iso(time.time())} for b in previous.get("blocks", [])]
    run.index = LedgerIndex.load(run.run_dir / "ledger.jsonl") if opts.resume is not None else None
    if run.index is None:
        return
    changes = check_resume(run.source, run.index, previous, run.agents)
    if changes and not opts.force:
        raise InputError(
            f"{run.run_dir}: the prompts or models changed since this run started; nothing was sent",
            changes,
            hint="resume with the original prompts file and config, or add --force to answer the changed prompts anew",
        )
    clean_previous_driver(previous, run.console)


def _record_start(run: _Run) -> None:
    """The cache checked, slots shared out, config.yaml and run.json written: all before anything starts."""
    run.cache = prepare_cache(run.settings)
    for note in cache_notes(run.cache, {a.name: a.params for a in run.agents}):
        log.info(note)
        run.console.print(f"note: {note}", markup=False, highlight=False)
    run.slots = slots_per_worker(run.agents, run.workers, run.in_process)
    run.agents = effective_concurrency(run.agents, run.slots, run.workers, run.in_process, run.console)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(run.settings.as_dict(redact=True), sort_keys=False))
    run.stop_file.unlink(missing_ok=True)
    run.meta = _start_meta(run)
    write_run_meta(run.run_dir, run.meta)


def _start_meta(run: _Run) -> dict[str, Any]:
    """run.json as the run starts: what it runs, where, and how a resume or ``cleanup`` finds it again."""
    opts, previous, settings = run.opts, run.previous, run.settings
    saved = previous.get("options", {})
    return {
        "run_id": run.run_id,
        "version": __version__,
        "command": opts.argv,
        "prompts_file": str(run.source.path),
        "started_at": previous.get("started_at") or iso(time.time()),
        "resumed_at": [*previous.get("resumed_at", []), iso(time.time())] if previous else [],
        "finished_at": None,
        "status": "running",
        "executor": "in-process" if run.in_process else settings.profile.executor,
        "profile": settings.profile.name,
        "workers": run.workers,
        "agent_slots": sum(a.concurrency for a in run.agents),
        # this driver's own process, where in-process chunks run: it holds every agent slot
        "driver_workers": [*previous.get("driver_workers", []), driver_worker_name(where_am_i()["node"] or "")],
        "agents": [a.describe() for a in run.agents],
        "routing": run.router.policy,
        "blocks": run.earlier,
        "cost": {k: v for k, v in vars(settings.run.cost).items() if v is not None} or None,
        "output": output_meta(
            settings.run.output.flatten,
            settings.run.output.errors_in_output,
            [a.params for a in run.agents],
            run.scanned.property_types,
        ),
        "cache": vars(run.cache) if run.cache is not None else None,
        "options": {
            "profile": opts.profile or saved.get("profile") or "local",
            "config_file": str(Path(opts.config_file).resolve()) if opts.config_file else saved.get("config_file"),
            "no_parsl": run.in_process,
            "cli": {**saved.get("cli", {}), **{k: v for k, v in opts.cli_settings.items() if v is not None}},
        },
    }


def _start_backend(run: _Run) -> None:
    """The driver's model server (when it runs one), then the backend; run.json learns its blocks at once."""
    from ..backends.parsl import ParslBackend

    settings = run.settings
    run.task_extra = {
        "node_endpoint_placeholder": NODE_LOCAL_ENDPOINT,
        "log_dir": str((run.run_dir / "logs").resolve()),
        "driver_session": secrets.token_hex(4),
    }
    if run.how == "driver":
        _start_driver_server(run)
    elif run.how == "per-node":
        run.node_server = settings.run.server
    run.backend = (
        InProcessBackend(settings.profile.workers)
        if run.in_process
        else ParslBackend(settings.profile, run.run_id, run.run_dir / "logs" / "parsl")
    )
    target = target_for(settings.profile)
    if isinstance(run.backend, ParslBackend) and target.warm_start and settings.profile.warm_start:
        run.backend = WarmStartBackend(run.backend, settings.profile.workers, run.run_dir / ".warm-start-drain")
        run.stop.also_touch.append(run.backend.drain_file)  # the chunks running in this process stop too
    run.backend.start()
    if not run.in_process:
        run.meta.update(target.run_record(settings.profile, run.run_id, run.previous))  # how `cleanup` finds its jobs later
    run.update_blocks()  # the interchange's pid, before anything can kill us


def _start_driver_server(run: _Run) -> None:
    from ..serve.server import ModelServer

    cfg = run.settings.run.server
    run.server = ModelServer(cfg, log_path=run.run_dir / "logs" / "model-server.log")
    run.console.print(f"starting the embedded model server ({cfg.model}) ...", style="dim")
    url = run.server.start()
    run.supervisor = ServerSupervisor(run.server, run.run_dir / "logs", cfg.max_restarts)
    run.task_extra.update(driver_server=url, driver_server_wait_s=cfg.ready_timeout_s + 30.0)
    if run.server.notice:  # not llama-server: one line saying why
        run.console.print(run.server.notice, markup=False, highlight=False)
    run.agents = [replace(a, endpoint=url) if a.endpoint == NODE_LOCAL_ENDPOINT else a for a in run.agents]
    run.meta["agents"] = [a.describe() for a in run.agents]


def _dispatch_all(run: _Run, ledger: Ledger, preload: Preload) -> None:
    """Every prompt still to answer, in chunks, until done or stopped."""
    opts, settings, index, backend = run.opts, run.settings, run.index, run.backend
    assert backend is not None
    deadline = walltime_deadline()
    total = run.scanned.valid - (len(index) if index is not None else 0)
    if index is not None and opts.retry_failed:
        total += index.failed
    size = chunk_size(run.slots, run.workers, max(total, 0), settings.run.limits.chunk_size)
    log.info("run %s: %d agents, %d workers, chunk size %d, backend %r", run.run_id, len(run.agents), run.workers, size, backend)
    agents = run.agents

    def make_task(cid: int, items: list[WorkItem]) -> ChunkTask:
        return ChunkTask(
            run_id=run.run_id,
            chunk_id=cid,
            agents=agents,
            slots=run.slots,
            limits=settings.run.limits,
            items=items,
            stop_file=str(run.stop_file),
            node_server=run.node_server,
            extra=run.task_extra,
            cache=run.cache,
        )

    with RunProgress(max(total, 0), console=run.console, quiet=opts.quiet) as progress:
        dispatch_chunks(
            backend=backend,
            items=work_items(run.source, run.scanned, index, opts.retry_failed, opts.force, run.router, run.skipped),
            make_task=make_task,
            chunk_size=size,
            in_flight=max(2, 2 * run.workers),
            ledger=ledger,
            progress=progress,
            stop=run.stop,
            stop_file=run.stop_file,
            deadline=deadline,
            grace_s=opts.grace_s,
            on_tick=run.update_blocks,
            on_turn=lambda: every_turn(preload, run.supervisor),
        )


def _finish(run: _Run, ledger: Ledger, preload: Preload) -> tuple[int, int, int, dict[str, Any]]:
    """(rows, failed, failures allowed, summary): results files, then run.json's final status and the summary.

    Every row is in the ledger once dispatch returns: close it, then write the results files
    while the backend shuts down in another thread (Parsl's cleanup: 0.05-0.5 s on one machine,
    more where SLURM blocks are cancelled or a warm start's Parsl is still starting). Its errors
    are raised again by result(). Signals stay handled meanwhile (the caller restores them after):
    a batch job's warning that arrives now (seen: during Parsl's shutdown) must not kill the driver mid-write.
    """
    run_dir, stop, meta = run.run_dir, run.stop, run.meta
    close_ledger(ledger)
    shutting_down = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parsl-chat-shutdown")
    ending = shutting_down.submit(run.end_backend)
    shutting_down.shutdown(wait=False)  # no more work for it; result() below waits for this one
    try:
        preload.wait()
        count = write_results(run_dir)
    except OSError as exc:
        raise cannot_write(run_dir, exc, stop) from None
    finally:
        ending.result()  # run.json and the summary need the blocks' ended_at
    meta["finished_at"] = iso(time.time())
    try:
        failed = failed_count(run_dir)
        prompts = run.scanned.valid + len(run.skipped)
        max_count, max_share = parse_max_failures(run.settings.run.max_failures)
        allowed = max_count if max_count is not None else math.floor((max_share or 0) * prompts)
        interrupted = bool(stop) and count < prompts  # a stop after the last answer leaves nothing to resume
        meta["status"] = "interrupted" if interrupted else "failed" if failed > allowed else "complete"
        meta["unfinished"] = prompts - count if interrupted else 0  # not failed: the resume sends them
        meta["stop_reason"] = stop.reason
        summary = write_run_summary(run_dir, meta)  # once, with the final status: it reads every row
    except OSError as exc:
        raise cannot_write(run_dir, exc, stop) from None
    return count, failed, allowed, summary


def _verdict(run: _Run, count: int, failed: int, allowed: int, summary: dict[str, Any]) -> RunOutcome:
    """The run's outcome: complete, or interrupted (to be resumed), or failed beyond --max-failures."""
    run_dir, stop = run.run_dir, run.stop
    prompts = run.scanned.valid + len(run.skipped)
    if run.meta["status"] == "interrupted":
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
