"""The ``parsl-chat`` command line: options in, library calls, messages and exit codes out.

This is the only place that turns :class:`ParslChatError` into a message and
an exit code; everything else raises.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ParslChatError

__all__ = ["cli", "main"]


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # batch jobs have no terminal: don't wrap at rich's default 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


err_console = _console(stderr=True)
out_console = _console(stderr=False)


class _Group(click.Group):
    """Catches the library's errors once, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ParslChatError as exc:
            _print_error(exc, debug=_debug(ctx))
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            err_console.print("parsl-chat: interrupted")
            ctx.exit(3)
        except Exception as exc:  # a bug, not a user error: short message unless --debug
            if _debug(ctx):
                traceback.print_exc()
            else:
                err_console.print(
                    f"parsl-chat: internal error: {type(exc).__name__}: {exc}\n"
                    "  run again with --debug for the traceback, and please report it"
                )
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or bool(getattr(ctx, "_parsl_chat_debug", False))


def _print_error(exc: ParslChatError, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    err_console.print(f"parsl-chat: error: {exc}", markup=False)
    problems = exc.problems
    for line in problems[:50]:
        err_console.print(f"  {line}", markup=False)
    if len(problems) > 50:
        err_console.print(f"  ... and {len(problems) - 50} more (parsl-chat validate lists all)", markup=False)
    if exc.hint:
        err_console.print(f"  hint: {exc.hint}", markup=False)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="parsl-chat")
@click.option("--debug", is_flag=True, envvar="PARSL_CHAT_DEBUG", help="Verbose logs and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Push many chat prompts through LLM agents with Parsl, and measure how well it went."""
    ctx.obj = {"debug": debug}
    # Arrow's allocator: the C library's, unless the user chose one. The pyarrow wheels' default
    # (mimalloc) keeps pages freed across threads, as the JSON reader's are, for good: 25-40 MB
    # more at the end of a run, measured in BENCHMARKS.md §3. Set before pyarrow is first imported.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)


# --------------------------------------------------------------------------- run


def _settings_options(func: Any) -> Any:
    """Options that map onto configuration keys (shared by run, chat and config show)."""
    options = [
        click.option("--profile", "profile", envvar="PARSL_CHAT_PROFILE", help="Profile name or YAML path (default: local)."),
        click.option(
            "--config",
            "config_file",
            envvar="PARSL_CHAT_CONFIG",
            type=click.Path(dir_okay=False),
            help="Agents and limits YAML (default: configs/agents.yaml).",
        ),
        click.option("--agents", "agent_count", type=int, help="Number of agents (default 3)."),
        click.option("--workers", type=int, help="Worker processes per node."),
        click.option("--endpoint", help="OpenAI-compatible base URL, e.g. http://host:8000/v1."),
        click.option("--model", help="Model name to request."),
        click.option("--routing", type=click.Choice(["round_robin", "least_loaded"]), help="How prompts are spread over agents."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _cli_settings(**kw: Any) -> dict[str, Any]:
    mapping = {
        "agent_count": "agent_count",
        "workers": "profile.workers",
        "endpoint": "endpoint",
        "model": "model",
        "routing": "routing",
        "max_failures": "max_failures",
        "schema": "schema",
        "flatten": "output.flatten",
        "cache": "cache.dir",
        "cache_mode": "cache.mode",
        "cache_sampled": "cache.sampled",
    }
    return {mapping[k]: v for k, v in kw.items() if k in mapping and v is not None}


@cli.command()
@click.argument("prompts", required=False)
@_settings_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default runs/<UTC time>-<id>).")
@click.option(
    "--no-parsl/--parsl",
    default=None,
    help="Run the same pipeline in this process, without Parsl (a --resume keeps the run's choice unless given).",
)
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Finish an earlier run in RUN_DIR.")
@click.option("--retry-failed", is_flag=True, help="With --resume: send prompts that ended in error again.")
@click.option("--force", is_flag=True, help="With --resume: accept changed prompts or models.")
@click.option("--max-failures", help="Failures allowed before exit 1: a count (10) or share (1%). Default 0.")
@click.option("--cache", metavar="DIR", help="Response cache shared across runs (a directory every node reaches).")
@click.option("--cache-mode", type=click.Choice(["read_write", "read", "off"]), help="Use of the cache (default read_write).")
@click.option(
    "--cache-sampled/--no-cache-sampled", default=None, help="Also cache answers drawn with temperature > 0 (default: no)."
)
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; send nothing.")
@click.option("--skip-invalid", is_flag=True, help="Record bad lines as error rows instead of refusing the file.")
@click.option(
    "--schema",
    type=click.Path(dir_okay=False),
    help="JSON Schema file every answer must match (agents with a schema of their own keep it).",
)
@click.option(
    "--flatten/--no-flatten",
    default=None,
    help="One typed results column per top-level schema property (config: output.flatten).",
)
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--debug", "debug_run", is_flag=True, help="Verbose logs and tracebacks.")
@click.pass_context
def run(ctx: click.Context, prompts: str | None, **opts: Any) -> None:
    """Send every prompt in PROMPTS (JSONL, .txt, or - for stdin) and write a run directory."""
    from .run import RunOptions, execute_run

    if opts["debug_run"]:
        ctx.find_root().obj["debug"] = True
    if prompts is None and opts["resume"] is None:
        raise click.UsageError("give a PROMPTS file, or --resume RUN_DIR")
    if (opts["retry_failed"] or opts["force"]) and opts["resume"] is None:
        raise click.UsageError("--retry-failed and --force go with --resume")
    options = RunOptions(
        prompts=prompts,
        profile=opts["profile"],
        config_file=opts["config_file"],
        out=opts["out"],
        resume=opts["resume"],
        no_parsl=opts["no_parsl"],
        dry_run=opts["dry_run"],
        skip_invalid=opts["skip_invalid"],
        retry_failed=opts["retry_failed"],
        force=opts["force"],
        quiet=opts["quiet"],
        cli_settings=_cli_settings(**opts),
        argv=["parsl-chat", *sys.argv[1:]],
    )
    outcome = execute_run(options, err_console, debug=_debug(ctx))
    if not opts["quiet"] or opts["dry_run"]:
        err_console.print(f"parsl-chat: {outcome.message}", markup=False)


@cli.command()
@_settings_options
@click.option("--no-parsl", is_flag=True, help="/batch runs in this process instead of on Parsl workers.")
@click.option("--session", "session_name", metavar="NAME", help="Keep the conversation on disk and continue it next time.")
@click.option("--list-sessions", is_flag=True, help="List saved sessions with turn counts and last use, then exit.")
def chat(session_name: str | None, list_sessions: bool, no_parsl: bool, **opts: Any) -> None:
    """Talk to the agents: streamed answers, /stats, /batch N, /agents, /history, /save, /quit (/help lists all)."""
    from .chat import ChatOptions, print_sessions, run_chat

    if list_sessions:
        print_sessions(out_console)
        return
    run_chat(
        ChatOptions(
            profile=opts["profile"],
            config_file=opts["config_file"],
            cli_settings=_cli_settings(**opts),
            no_parsl=no_parsl,
            session=session_name,
        )
    )


# --------------------------------------------------------------------------- validate / profiles / config


@cli.command()
@click.argument("prompts")
@click.option("--config", "config_file", help="Agents and limits YAML (limits.max_line_mb: the longest line accepted).")
def validate(prompts: str, config_file: str | None) -> None:
    """Check a prompts file line by line; send nothing. Exit 2 if any line is bad."""
    import tempfile

    from .config import load_settings
    from .errors import InputError
    from .io.prompts import PromptSource, scan, spool_stdin

    limit = load_settings("local", config_file, {}).run.limits.max_line_bytes
    if prompts == "-":
        prompts = str(spool_stdin(Path(tempfile.mkdtemp(prefix="parsl-chat-"))))
    result = scan(PromptSource(prompts, max_line_bytes=limit))
    if not result.ok:
        raise InputError(
            f"{prompts}: {result.problem_count} bad line(s), {result.valid} valid prompt(s)",
            [str(p) for p in result.problems],
        )
    convs = f" ({len(result.conversation_ends)} multi-turn conversation(s))" if result.conversation_ends else ""
    out_console.print(f"{prompts}: {result.valid} valid prompt(s){convs}", markup=False)


@cli.command()
def profiles() -> None:
    """List shipped and user profiles."""
    from .config import list_profiles, read_yaml

    table = Table("profile", "executor", "kind", "path", "description", box=None)
    for name, path, kind in list_profiles():
        data = read_yaml(path)
        table.add_row(name, str(data.get("executor", "?")), kind, str(path), str(data.get("description", "")))
    out_console.print(table)


@cli.group()
def config() -> None:
    """Inspect the resolved configuration."""


@config.command("show")
@_settings_options
@click.option("--max-failures", help="As for run.")
def config_show(**opts: Any) -> None:
    """Every setting with its value and where it came from (cli / env / yaml / default)."""
    from .config import load_settings
    from .run import describe_fleet

    settings = load_settings(opts["profile"] or "local", opts["config_file"], _cli_settings(**opts))
    table = Table("setting", "value", "source", box=None)
    for key, value, source in settings.rows():
        table.add_row(key, "" if value is None else str(value), str(source))
    out_console.print(table)
    fleet = "\n".join(describe_fleet(settings))
    out_console.print(f"\nfleet, as a run resolves it:\n{fleet}", markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- cache


@cli.group("cache")
def cache_group() -> None:
    """Inspect and maintain a response cache directory (run --cache DIR fills it)."""


@cache_group.command("stats")
@click.argument("cache_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def cache_stats(cache_dir: Path, as_json: bool) -> None:
    """Entries, duplicates, damaged lines, files and bytes of the cache in DIR."""
    import json

    from .io.cache import stats

    figures = stats(cache_dir).as_dict()
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    files = figures["files"]
    table = Table("", "", box=None, show_header=False)
    table.add_row("cache", figures["dir"])
    table.add_row("entries", f"{figures['entries']:,} distinct requests")
    table.add_row("records", f"{figures['records']:,} ({figures['duplicates']:,} duplicates, dropped by compact)")
    table.add_row("damaged lines", f"{figures['damaged_lines']:,} (torn or garbled: skipped)")
    table.add_row("files", f"{files['compacted']} compacted, {files['sealed']} sealed, {files['open']} open segments")
    table.add_row("size", f"{figures['bytes'] / 2**20:,.1f} MiB")
    out_console.print(table)


@cache_group.command("compact")
@click.argument("cache_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option(
    "--idle-s",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Also merge open segments untouched this long (their writer died). 0 when no run is writing.",
)
def cache_compact(cache_dir: Path, idle_s: float) -> None:
    """Merge the segments of DIR into one indexed file; drops duplicate and damaged lines. Safe while runs write."""
    from .io.cache import compact

    done = compact(cache_dir, idle_s=idle_s)
    if done.output is None:
        out_console.print(f"{done.root}: nothing to compact ({done.entries:,} entries)", markup=False)
    else:
        out_console.print(
            f"{done.root}: merged {done.merged_files} file(s) into {done.output}: {done.entries:,} entries, "
            f"{done.dropped:,} duplicate/damaged line(s) dropped, {done.bytes_before / 2**20:,.1f} -> "
            f"{done.bytes_after / 2**20:,.1f} MiB",
            markup=False,
        )
    if done.left_open:
        out_console.print(
            f"  {done.left_open} open segment(s) left as they are (written less than {idle_s:g} s ago)", markup=False
        )


@cache_group.command("clear")
@click.argument("cache_dir", metavar="DIR", type=click.Path(path_type=Path))
def cache_clear(cache_dir: Path) -> None:
    """Delete every entry of the cache in DIR (the directory stays a cache)."""
    from .io.cache import clear

    files, size = clear(cache_dir)
    out_console.print(f"{cache_dir}: removed {files} file(s), {size / 2**20:,.1f} MiB", markup=False)


# --------------------------------------------------------------------------- serve / cleanup / report


#: ``serve --simulate``'s fault options beyond --latency-ms and --rate-invalid-output: FaultPlan fields,
#: as ``python -m parsl_chat.serve.simulated`` takes them (FaultPlan checks them; rates must not sum over 1)
_SIMULATE_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--jitter-ms", click.FloatRange(min=0), "uniform extra delay per request, in [0, N] ms"),
    ("--rate-500", click.FloatRange(0, 1), "share of requests answered 500"),
    ("--rate-429", click.FloatRange(0, 1), "share answered 429 with a Retry-After header"),
    ("--retry-after-s", click.FloatRange(min=0), "the Retry-After of a 429"),
    ("--rate-hang", click.FloatRange(0, 1), "share never answered (until the client gives up)"),
    ("--rate-drop", click.FloatRange(0, 1), "share whose connection is closed without an answer"),
    ("--fail-first-attempts", click.IntRange(min=0), "500 on the first N attempts of each distinct prompt"),
    ("--completion-tokens", click.IntRange(min=1), "words per answer"),
    ("--max-concurrency", click.IntRange(min=0), "slots (others queue); 0 = unlimited"),
    ("--model", str, "the model name served"),
    ("--seed", int, "seed of the fault draws (the same faults in every run)"),
)


def _simulate_options(func: Any) -> Any:
    from .serve.faults import FaultPlan

    defaults = FaultPlan()
    for flag, kind, help_ in reversed(_SIMULATE_OPTIONS):
        name = flag[2:].replace("-", "_")
        default = getattr(defaults, name)
        option = click.option(
            flag, name, type=kind, default=default, show_default=default is not None, help=f"Simulated: {help_}."
        )
        func = option(func)
    return func


@cli.command()
@click.option("--simulate", is_flag=True, help="Serve the simulated endpoint (load tests; no model).")
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Simulated latency per request.")
@click.option(
    "--rate-invalid-output",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Simulated: share of answers that are not JSON (structured-output load tests).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=0, help="Port (default: a free one).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Config whose 'server' section to use.")
@_simulate_options
def serve(
    simulate: bool,
    latency_ms: float,
    rate_invalid_output: float,
    host: str,
    port: int,
    config_file: str | None,
    **faults: Any,
) -> None:
    """Start the embedded model server (or the simulated endpoint) in the foreground and print its URL."""
    from dataclasses import replace

    if simulate:
        from .serve.simulated import FaultPlan, run_server

        try:
            plan = FaultPlan(latency_ms=latency_ms, rate_invalid_output=rate_invalid_output, **faults)
        except ValueError as exc:  # e.g. rates that add up to more than 1
            raise click.UsageError(str(exc)) from exc
        run_server(
            plan,
            host=host,
            port=port,
            ready=lambda url: click.echo(f"parsl-chat simulated endpoint: {url}"),
        )
        return
    from .config import load_settings
    from .serve.server import serve_foreground

    settings = load_settings("local", config_file)
    cfg = replace(settings.run.server, host=host, port=port or settings.run.server.port)
    if cfg.kind == "none":
        cfg = replace(cfg, kind="embedded")
    raise SystemExit(serve_foreground(cfg, None, click.echo))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def cleanup(run_dir: Path) -> None:
    """Cancel scheduler jobs (SLURM blocks, pods) left behind by RUN_DIR's dead driver."""
    from .backends.cleanup import cleanup_run

    for line in cleanup_run(run_dir):
        out_console.print(line, markup=False)


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the HTML report.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def report(run_dirs: tuple[Path, ...], html: Path | None, as_json: bool) -> None:
    """Summary table of one run (and an HTML report), or a scaling comparison of several."""
    from .report import report_runs

    raise SystemExit(report_runs(list(run_dirs), html, as_json, out_console))


def main(argv: list[str] | None = None) -> int:
    """The ``parsl-chat`` program (console script, ``python -m parsl_chat``): its exit code.

    The process is expected to end right after: the objects made so far are frozen out of
    the garbage collector, whose final passes over everything pandas, pyarrow and Parsl
    created took 0.3-0.4 s of every run's exit (0.05 s frozen; measured in BENCHMARKS.md §1).
    """
    try:
        cli.main(args=argv, prog_name="parsl-chat", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    gc.freeze()
    return code
