"""The self-contained HTML report of one run.

Every plot is embedded as a base64 PNG drawn with matplotlib's Agg renderer, so the
file opens offline with no external CSS, scripts or fonts. Each plot is an
``<img data-plot="NAME">``; an inline script sets ``data-plots-loaded`` /
``data-plots-total`` on ``<body>`` once the images have decoded (used by the
headless-browser test).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .figures import PlotContext, img_html, plot_context
from .format import (
    DASH,
    LATENCY_HEADERS,
    MAX_TERMINAL_ROWS,
    UNFINISHED_DETAIL,
    cache_brief,
    error_brief,
    fmt_int,
    fmt_num,
    fmt_pct,
    fmt_s,
    latency_rows,
    natural_key,
    now_utc,
    share_of,
    short_list,
    when_text,
)
from .html_page import caption_html, card_html, escape, html_table, page_html, tone_class, write_page
from .plots import ALT, RUN_PLOTS
from .redaction import redact, redact_text

__all__ = ["DEFINITIONS", "write_html"]


#: the report's "how these numbers are defined" list: (term, definition)
DEFINITIONS = (
    (
        "wall time",
        "run start → run end from run.json (driver wall clock); first submitted → last finished when run.json lacks them",
    ),
    ("prompts/s", "prompts recorded (ok + failed) ÷ wall time; ok/s counts successful prompts only"),
    ("tokens/s", "completion tokens ÷ wall time (total tokens/s adds prompt tokens)"),
    ("latency", "finished − started of a request (all its attempts), successful requests only; percentiles interpolate linearly"),
    ("queue wait", "started − submitted of a request"),
    ("busy time", "sum of request latencies (ok and failed)"),
    ("parallel efficiency", "busy agent-seconds ÷ (agent slots × wall time); 100% = every slot always busy"),
    ("utilisation", "agent: busy ÷ (its concurrency × wall); worker: busy ÷ wall"),
    ("node active", "time with at least one request in flight on the node (union of intervals) ÷ wall"),
    (
        "allocation",
        "node-seconds from each block's start (first request if unknown) to its end; "
        "busy = union of request intervals per node; idle = allocated − busy",
    ),
)


def _cards(summary: Mapping[str, Any]) -> str:
    counts, rates, lat = summary["counts"], summary["throughput"], summary["latency_s"]
    prompts = counts["prompts"]
    ok_share = counts["ok"] / prompts if prompts else None
    cards = [
        card_html("prompts", fmt_int(prompts), f"{counts['retried']:,} retried"),
        card_html("succeeded", fmt_int(counts["ok"]), fmt_pct(ok_share), "good" if counts["error"] == 0 and prompts else ""),
        card_html("failed", fmt_int(counts["error"]), error_brief(counts) or "none", "bad" if counts["error"] else ""),
        *([card_html("unfinished", fmt_int(counts["unfinished"]), UNFINISHED_DETAIL)] if counts.get("unfinished") else []),
        card_html("wall time", fmt_s(summary["wall_s"]), summary["wall"]["basis"].replace(" -> ", " → ")),
        card_html("prompts / s", fmt_num(rates["prompts_per_s"]), f"ok/s {fmt_num(rates['ok_per_s'])}"),
        card_html(
            "tokens / s",
            fmt_num(rates["completion_tokens_per_s"]),
            f"completion; {fmt_num(rates['total_tokens_per_s'])} incl. prompt",
        ),
        card_html(
            "latency p50", fmt_s(lat["p50"]) if lat else DASH, f"mean {fmt_s(lat['mean'])}" if lat else "no successful prompts"
        ),
        card_html(
            "latency p95",
            fmt_s(lat["p95"]) if lat else DASH,
            f"p99 {fmt_s(lat['p99'])}, max {fmt_s(lat['max'])}" if lat else "no successful prompts",
        ),
        card_html(
            "parallel efficiency",
            fmt_pct(summary["parallel_efficiency"]),
            f"busy agent-s ÷ ({summary.get('agent_slots') or '?'} slots × wall)",
            tone_class(summary["parallel_efficiency"]),
        ),
    ]
    cards += _resource_cards(summary)
    return '<div class="cards">' + "".join(cards) + "</div>"


def _resource_cards(summary: Mapping[str, Any]) -> list[str]:
    """The cards a run has only with a cache, server timings, an allocation or prices."""
    cards = []
    cache = summary.get("cache")
    if cache:
        cards.append(card_html("cache hits", fmt_int(cache["hits"]), cache_brief(cache)))
    server = summary.get("server_time")
    if server:
        cards.append(
            card_html(
                "server slot wait",
                fmt_pct(server["queue_share"]),
                f"of latency queued at the model server; efficiency without it {fmt_pct(server['work_efficiency'])}",
                tone_class(None if server["queue_share"] is None else 1 - server["queue_share"]),
            )
        )
    alloc = summary["allocation"]
    if alloc:
        cards.append(
            card_html(
                "allocation busy",
                fmt_pct(alloc["busy_fraction"]),
                f"{fmt_num(alloc['node_s_busy'])} of {fmt_num(alloc['node_s_allocated'])} node-s",
                tone_class(alloc["busy_fraction"]),
            )
        )
    cost = summary["cost"]
    if cost:
        value = fmt_num(cost["su"], "SU") if cost["unit"] == "SU" else f"${cost['usd']:,.4f}"
        per = cost.get("su_per_1m_tokens") if cost["unit"] == "SU" else cost.get("usd_per_1m_tokens")
        cards.append(card_html("cost", value, f"{fmt_num(per)} {cost['unit']} per 1M tokens"))
    return cards


def _latency_html(summary: Mapping[str, Any]) -> str:
    rows = latency_rows(summary)
    out = html_table(list(LATENCY_HEADERS), rows) if rows else ""
    if not summary["latency_s"]:
        out += '<p class="notes">No successful prompts: latency not available.</p>'
    return out


def _agents_html(summary: Mapping[str, Any]) -> str:
    rows = [
        [
            a["agent"],
            a["model"],
            fmt_int(a["concurrency"]),
            fmt_int(a["prompts"]),
            fmt_int(a["ok"]),
            fmt_int(a["error"]),
            fmt_s(a["busy_s"]),
            fmt_pct(a["utilisation"]),
            fmt_num(a["completion_tokens_per_s"]),
            fmt_s(a["latency_p50_s"]),
            fmt_s(a["latency_p95_s"]),
        ]
        for a in summary["agents"]
    ]
    headers = ["agent", "model", "slots", "prompts", "ok", "failed", "busy", "utilisation", "tokens/s", "p50", "p95"]
    return html_table(headers, rows, left=(0, 1)) + caption_html("utilisation = busy time ÷ (agent slots × wall time)")


def _nodes_html(summary: Mapping[str, Any]) -> str:
    nodes = sorted(summary["nodes"], key=lambda n: natural_key(n["node"]))
    rows = [
        [
            n["node"],
            ", ".join(n["hostnames"]),
            fmt_int(n["workers"]),
            fmt_int(n["prompts"]),
            fmt_pct(n["share_prompts"]),
            fmt_int(n["error"]),
            fmt_s(n["busy_s"]),
            fmt_pct(n["share_busy"]),
            fmt_pct(n["active_fraction"]),
            fmt_num(n["completion_tokens_per_s"]),
        ]
        for n in nodes
    ]
    headers = ["node", "hostnames", "workers", "prompts", "share", "failed", "busy", "busy share", "active", "tokens/s"]
    table = html_table(headers, rows, left=(0, 1))
    if len(nodes) > MAX_TERMINAL_ROWS:
        table = f"<details><summary>all {len(nodes)} nodes</summary>{table}</details>"
    return table + caption_html("active = time with at least one request in flight on the node ÷ wall time")


def _workers_html(summary: Mapping[str, Any]) -> str:
    workers = sorted(summary["workers"], key=lambda w: (natural_key(w["node"]), natural_key(w["worker"])))
    rows = [
        [w["worker"], w["node"], fmt_int(w["prompts"]), fmt_int(w["error"]), fmt_s(w["busy_s"]), fmt_pct(w["utilisation"])]
        for w in workers
    ]
    table = html_table(["worker", "node", "prompts", "failed", "busy", "utilisation"], rows, left=(0, 1))
    return f"<details><summary>per-worker table ({len(workers)} workers)</summary>{table}</details>" if workers else ""


def _allocation_html(summary: Mapping[str, Any]) -> str:
    alloc = summary["allocation"]
    if not alloc:
        return ""
    total = alloc["node_s_allocated"]
    head = html_table(
        ["", "node-seconds", "node-hours", "share"],
        [
            ["allocated", fmt_num(total), fmt_num(total / 3600), "100%" if total else DASH],
            [
                "busy (requests in flight)",
                fmt_num(alloc["node_s_busy"]),
                fmt_num(alloc["node_s_busy"] / 3600),
                fmt_pct(alloc["busy_fraction"]),
            ],
            [
                "idle",
                fmt_num(alloc["node_s_idle"]),
                fmt_num(alloc["node_s_idle"] / 3600),
                fmt_pct(share_of(alloc["node_s_idle"], total)),
            ],
        ],
    )
    blocks = html_table(
        ["block", "job id", "nodes", "submitted", "start", "end", "queue wait", "duration", "node-s", "prompts"],
        [
            [
                b["block"],
                b["job_id"],
                short_list(b["nodes"]),
                when_text(b["submitted_at"], clock=True),
                when_text(b["start"], clock=True),
                when_text(b["end"], clock=True),
                fmt_s(b["queue_wait_s"]),
                fmt_s(b["duration_s"]),
                fmt_num(b["allocated_node_s"]),
                fmt_int(b["prompts"]),
            ]
            for b in alloc["blocks"]
        ],
        left=(0, 1, 2, 3, 4, 5),
    )
    starts = sorted({b["start_basis"] for b in alloc["blocks"]})
    ends = sorted({b["end_basis"] for b in alloc["blocks"]})
    caption = caption_html(
        f"jobs: {', '.join(alloc['job_ids']) or DASH}. Times UTC; start = {' / '.join(starts)}, end = {' / '.join(ends)}. "
        "Queue wait = first request started on the block − block submitted."
    )
    return head + blocks + caption


def _errors_html(summary: Mapping[str, Any]) -> str:
    errors = summary["errors"]
    if not errors:
        return "<p>No failed prompts.</p>" if summary["counts"]["prompts"] else ""
    return html_table(
        ["error type", "count", "example message"],
        [[e["error_type"], fmt_int(e["count"]), e["example"]] for e in errors],
        wrap=(2,),
    )


def _structured_html(summary: Mapping[str, Any]) -> str:
    rows = summary.get("structured")
    if not rows:
        return ""
    table = html_table(
        ["agent", "model", "answers", "valid", "invalid_output", "invalid rate"],
        [
            [r["agent"], r["model"], fmt_int(r["answers"]), fmt_int(r["valid"]), fmt_int(r["invalid_output"]),
             fmt_pct(r["invalid_output_rate"])]
            for r in rows
        ],
        left=(0, 1),
    )  # fmt: skip
    caption = caption_html("invalid_output: every answer, asked again up to limits.max_invalid_retries times, failed its schema")
    return "<h2>Structured output</h2>" + table + caption


def _slowest_html(summary: Mapping[str, Any]) -> str:
    rows = [
        [s["custom_id"], s["agent"], s["node"], s["status"], fmt_int(s["attempts"]), fmt_s(s["latency_s"])]
        for s in summary["slowest"]
    ]
    return (
        html_table(["custom_id", "agent", "node", "status", "attempts", "latency"], rows, left=(0, 1, 2, 3))
        if rows
        else "<p>No request ran.</p>"
    )


def _cost_html(summary: Mapping[str, Any]) -> str:
    cost = summary["cost"]
    if not cost:
        return ""
    if cost["unit"] == "SU":
        rows = [
            ["service units", fmt_num(cost["su"], "SU")],
            ["node-hours", fmt_num(cost["node_hours"])],
            ["SU per 1M tokens", fmt_num(cost["su_per_1m_tokens"])],
            ["SU per 1000 ok prompts", fmt_num(cost["su_per_1k_ok_prompts"])],
        ]
        note = f"{cost['su_per_node_hour']} SU per node-hour × {cost['basis']}"
    else:
        rows = [
            ["USD", f"${cost['usd']:,.4f}"],
            ["USD per 1M tokens", fmt_num(cost["usd_per_1m_tokens"])],
            ["USD per 1000 ok prompts", fmt_num(cost["usd_per_1k_ok_prompts"])],
        ]
        note = (
            f"${cost['usd_per_1m_prompt_tokens']} per 1M prompt tokens"
            f" + ${cost['usd_per_1m_completion_tokens']} per 1M completion tokens"
        )
    return "<h2>Cost</h2>" + html_table(["", "value"], rows) + caption_html(note)


def _config_html(df: pd.DataFrame) -> str:
    run = df.attrs.get("run") or {}
    parts = ["<h2>Run configuration</h2>", "<h3>run.json</h3>"]
    parts.append(
        f"<pre>{html.escape(json.dumps(redact(run), indent=2, sort_keys=False))}</pre>" if run else "<p>run.json is missing.</p>"
    )
    run_dir = df.attrs.get("run_dir")
    config = Path(str(run_dir)) / "config.yaml" if run_dir else None
    if config is not None and config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        parts += ["<h3>config.yaml</h3>", f"<pre>{html.escape(redact_text(text))}</pre>"]
    return "".join(parts)


def _definitions_html() -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in DEFINITIONS)
    return f'<details><summary>How these numbers are defined</summary><dl class="defs">{items}</dl></details>'


def _header(summary: Mapping[str, Any]) -> str:
    run = summary["run"]
    status = str(run.get("status") or "unknown")
    meta = [
        f"executor {run.get('executor') or '?'}",
        f"{fmt_int(run.get('workers'))} workers" if run.get("workers") else None,
        f"{summary.get('agent_slots')} agent slots" if summary.get("agent_slots") else None,
        f"routing {run.get('routing')}" if run.get("routing") else None,
        f"{when_text(summary['wall']['start'])} → {when_text(summary['wall']['end'])}",
        f"rows from {run.get('source')}",
    ]
    out = (
        f"<h1>parsl-chat run report: {escape(run.get('run_id') or 'run')} "
        f'<span class="badge {escape(status)}">{escape(status)}</span></h1>'
        f'<p class="sub">{escape(" · ".join(m for m in meta if m))}</p>'
    )
    notes = list(run.get("notes") or [])
    if summary["counts"]["prompts"] == 0:
        notes.insert(0, "No prompts recorded in this run: there is nothing to measure yet.")
    elif summary["latency_s"] is None:
        notes.append("No successful prompts: latency not available.")
    if notes:
        out += '<div class="notes">' + "".join(f"<p>⚠ {escape(n)}</p>" for n in notes) + "</div>"
    return out


def _figure_html(name: str, ctx: PlotContext) -> str:
    return f"<figure>{img_html(name, RUN_PLOTS[name](ctx), ALT[name])}</figure>"


def write_html(df: pd.DataFrame, summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report of one run to ``path`` and return it.

    Contents: headline numbers, Gantt timeline per worker (coloured by agent,
    failures red; large runs are thinned to at most :data:`MAX_TIMELINE_LANES`
    workers and :data:`MAX_TIMELINE_BARS` bars), requests in flight,
    throughput, latency histogram and CDF, per-agent / per-node / per-worker
    bars, allocation use, error breakdown, slowest prompts, cost, run.json and
    config.yaml (secrets masked), and the metric definitions.
    """
    ctx = plot_context(df, summary)
    fig = _figure_html
    sections = [
        _header(summary),
        _cards(summary),
        "<h2>Timeline</h2>",
        fig("timeline", ctx),
        f'<div class="grid2">{fig("inflight", ctx)}{fig("throughput", ctx)}</div>',
        "<h2>Latency and queue wait</h2>",
        f'<div class="grid2">{fig("latency_hist", ctx)}{fig("latency_cdf", ctx)}</div>',
        _latency_html(summary),
        "<h2>Agents and nodes</h2>",
        f'<div class="grid2">{fig("agents", ctx)}{fig("nodes", ctx)}</div>',
        _agents_html(summary),
        _nodes_html(summary),
        "<h2>Workers and allocation</h2>" if summary["allocation"] else "<h2>Workers</h2>",
        f'<div class="grid2">{fig("workers", ctx)}{fig("allocation", ctx) if summary["allocation"] else ""}</div>',
        _allocation_html(summary),
        _workers_html(summary),
        "",
    ]
    sections += [
        "<h2>Failures</h2>",
        f'<div class="grid2">{fig("errors", ctx)}<div>{_errors_html(summary)}</div></div>',
        _structured_html(summary),
        "<h2>Slowest prompts</h2>",
        _slowest_html(summary),
        _cost_html(summary),
        _config_html(df),
        "<h2>Definitions</h2>",
        _definitions_html(),
        f"<footer>parsl-chat {escape(summary['run'].get('version') or '')} · report generated {now_utc()}</footer>",
    ]
    title = f"parsl-chat report {summary['run'].get('run_id') or ''}"
    return write_page(Path(path), page_html(title, "".join(sections)))
