"""The HTML shell shared by the run and comparison reports: style, escaping, tables, cards, writing the file."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._files import atomic_write
from ..errors import OutputError
from .format import DASH

__all__ = ["CSS", "LOADED_SCRIPT", "caption_html", "card_html", "escape", "html_table", "page_html", "tone_class", "write_page"]


CSS = """
:root { --fg:#1d2433; --muted:#5b6474; --line:#e3e6ea; --card:#f6f7f9; --ok:#2a9d8f; --bad:#d62728; --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 14px; }
.badge { display:inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; font-weight:600;
         color:#fff; background:#6c757d; vertical-align: middle; }
.badge.complete { background: var(--ok); } .badge.failed { background: var(--bad); }
.badge.interrupted, .badge.running { background: var(--warn); }
.notes { background:#fff8e6; border:1px solid #f0d58c; border-radius:8px; padding:10px 14px; margin: 8px 0 16px; }
.notes p { margin: 2px 0; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; }
.card { background: var(--card); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 13px; }
.card .v { font-size: 26px; font-weight: 700; line-height: 1.2; margin-top: 2px; }
.card .d { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
.v.good { color: var(--ok); } .v.bad { color: var(--bad); } .v.warn { color: var(--warn); }
.grid2 { display:grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 18px; align-items:start; }
figure { margin: 0 0 18px; }
img[data-plot] { max-width: 100%; height: auto; display:block; border:1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; margin: 10px 0 4px; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--card); font-weight: 600; }
th:first-child, td:first-child, td.l, th.l { text-align: left; }
td.wrap { white-space: normal; max-width: 560px; text-align:left; color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 10px; }
pre { background: var(--card); padding: 12px 14px; border-radius: 8px; overflow-x: auto; font-size: 13px; max-height: 520px; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--muted); }
dl.defs { display:grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 14px; }
dl.defs dt { font-weight: 600; } dl.defs dd { margin: 0; color: var(--muted); }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; }
"""


LOADED_SCRIPT = """
(function () {
  function count() {
    var imgs = document.querySelectorAll('img[data-plot]');
    var loaded = 0;
    imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { loaded += 1; } });
    document.body.dataset.plotsLoaded = String(loaded);
    document.body.dataset.plotsTotal = String(imgs.length);
  }
  if (document.readyState === 'complete') { count(); } else { window.addEventListener('load', count); }
})();
"""


def escape(value: Any) -> str:
    return html.escape(DASH if value is None else str(value))


def card_html(key: str, value: str, detail: str = "", tone: str = "") -> str:
    return (
        f'<div class="card"><div class="k">{escape(key)}</div><div class="v {tone}">{escape(value)}</div>'
        f'<div class="d">{escape(detail)}</div></div>'
    )


def tone_class(value: float | None) -> str:
    if value is None:
        return ""
    return "good" if value >= 0.8 else "warn" if value >= 0.5 else "bad"


def html_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[int] = (0,), wrap: Sequence[int] = ()
) -> str:
    head = "".join(f'<th class="{"l" if i in left or i in wrap else ""}">{escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = "wrap" if i in wrap else "l" if i in left else ""
            cells.append(f'<td class="{cls}">{escape(cell)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def caption_html(text: str) -> str:
    return f'<p class="caption">{escape(text)}</p>'


def page_html(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main><script>{LOADED_SCRIPT}</script></body></html>\n"
    )


def write_page(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot write the report ({exc.strerror or exc})", hint="pass --html PATH somewhere writable"
        ) from exc
    return path
