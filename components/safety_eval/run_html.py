"""The run's page as HTML, for a person: the verdict first (gate, final model, stages, cost), the table of what each
stage did, then one card per stage (its figures beside the paper's, its key plot next to them), and last the raw
figures, lineage hashes and paths, collapsed. One self-contained file: inline CSS, plots as PNG data URIs, no script
(the KFP UI shows an HTML artifact in a sandboxed iframe that runs none) and no link but to the page's own ids.
run_page.py gathers what this renders.
"""
from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubellama.components.core.io.report import CSS, Section, Table, html_table, inline, section_body

# The element ids the page promises (a browser test checks them), in page order; between the table and the details
# comes one STAGE_ID card per stage of the run.
VERDICT_ID, STAGES_ID, DETAILS_ID = "verdict", "stages", "details"
SECTIONS = (VERDICT_ID, STAGES_ID, DETAILS_ID)
STAGE_ID = "stage-{}"
DID_HEADER = ("stage", "status", "metric", "before", "after", "n", "change")
_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

PAGE_CSS = """body{max-width:72em}.sub{color:#59636e;margin-top:-.6em}
section{margin:1.2em 0}.card,.verdict{border:1px solid #d0d7de;border-left:.35em solid #8c959f;border-radius:6px;
padding:.2em 1em .8em}.card h2,.verdict h2{margin-top:.6em}.ok{border-left-color:#1a7f37}.bad{border-left-color:#cf222e}
.warn{border-left-color:#9a6700}.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:85%;
font-weight:600;color:#fff;background:#8c959f}.badge.ok{background:#1a7f37}.badge.bad{background:#cf222e}
.badge.warn{background:#9a6700}.headline{font-size:1.2em;font-weight:600;margin:.4em 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em;margin:.5em 0}dl.facts dt{font-weight:600}
dl.facts dd{margin:0}.body{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.body>div{flex:1 1 24em;min-width:0}.body>figure{flex:1 1 24em;min-width:0;margin:0}
figcaption{color:#59636e;font-size:90%}details{margin:.5em 0}summary{cursor:pointer;color:#0969da}
.error{color:#cf222e;font-weight:600}td.rose,td.fell{font-weight:600}.none{color:#59636e}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{flex:1 1 20em;margin:0}"""


def stage_id(folder: str) -> str:
    """The id of a stage's card: `stage-<run folder>` (characters an id should not hold become '_')."""
    return STAGE_ID.format(_ID_CHARS.sub("_", folder))


@dataclass
class Card:
    """One stage of the run: its run folder, status, short facts, the rows [figure, this run, the paper's] where the
    paper has a figure, its plots (the key plot first) and every figure of its report."""
    name: str
    status: str
    error: str = ""
    facts: Sequence[str] = ()
    paper: Sequence[Sequence[Any]] = ()
    plots: Sequence[tuple[str, bytes]] = ()
    raw: Sequence[tuple[str, str]] = ()


@dataclass
class Verdict:
    """The top of the page. `gate_ok`: True passed, False failed, None not evaluated; the estimate is the cost
    ledger's for the configured model at the paper's scale."""
    headline: str
    gate_ok: bool | None
    gate: str
    failed_lines: Sequence[tuple[str, str]] = ()
    final_model: str = ""
    stages: str = ""
    cost: str = ""
    cost_table: Table | None = None
    estimate_gpu_hours: float = 0.0
    estimate_tco2: float = 0.0
    run_failed: bool = False


def status_class(status: str | bool | None) -> str:
    if status in ("completed", "pass", "passed", True):
        return "ok"
    if status in ("failed", "fail", False):
        return "bad"
    return "warn"


def _badge(label: str, cls: str) -> str:
    return f'<span class="badge {cls}">{html.escape(label)}</span>'


def _img(alt: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def _verdict(v: Verdict, cards: Sequence[Card]) -> list[str]:
    names = {c.name for c in cards}
    gate = {True: "passed", False: "failed", None: "none"}[v.gate_ok]
    box = "bad" if v.run_failed else status_class(gate)
    out = [f'<section id="{VERDICT_ID}" class="verdict {box}"><h2>Verdict</h2>',
           f'<p class="headline">{inline(v.headline)}</p>', '<dl class="facts">',
           f"<dt>Safety gate</dt><dd>{_badge(gate, status_class(gate))} {inline(v.gate)}"]
    if v.failed_lines:
        out += ["<ul>"] + [f'<li><span class="error">fail</span> {inline(rule)}: {inline(detail)}</li>'
                           for rule, detail in v.failed_lines] + ["</ul>"]
    out.append("</dd>")
    if v.final_model:
        link = f'<a href="#{stage_id(v.final_model)}">{inline(v.final_model)}</a>' if v.final_model in names \
            else inline(v.final_model)
        out.append(f"<dt>Final model</dt><dd>{link}</dd>")
    out.append(f"<dt>Stages</dt><dd>{inline(v.stages)}</dd>")
    out.append(f"<dt>Cost</dt><dd>{inline(v.cost)}")
    if v.cost_table is not None and v.cost_table.rows:
        out += ["<details><summary>Cost by stage</summary>", *html_table(v.cost_table), "</details>"]
    return out + ["</dd>", "</dl>", "</section>"]


def _did(text: str, rows: Sequence[tuple[str, Sequence[Any]]], names: set[str]) -> list[str]:
    """The table of what each stage did. rows: (run folder, [label, status, metric, before, after, n, change]);
    consecutive rows of one label share its stage and status cells."""
    out = [f'<section id="{STAGES_ID}"><h2>What each stage did</h2>', f"<p>{inline(text)}</p>", "<table>",
           "<tr>" + "".join(f"<th>{h}</th>" for h in DID_HEADER) + "</tr>"]
    i = 0
    while i < len(rows):
        folder, first = rows[i]
        span = 1
        while i + span < len(rows) and rows[i + span][1][0] == first[0] and rows[i + span][0] == folder:
            span += 1
        for k, (_, row) in enumerate(rows[i:i + span]):
            label, status, *rest = row
            tds = []
            if k == 0:
                rs = f' rowspan="{span}"' if span > 1 else ""
                name = f'<a href="#{stage_id(folder)}">{inline(label)}</a>' if folder in names else inline(label)
                tds = [f"<td{rs}>{name}</td>", f"<td{rs}>{_badge(str(status), status_class(str(status)))}</td>"]
            change = str(rest[-1]) if rest else ""
            tds += [f"<td>{inline(c)}</td>" for c in rest[:-1]]
            tds.append(f'<td class="{html.escape(change)}">{inline(change)}</td>' if change in ("rose", "fell")
                       else f"<td>{inline(rest[-1] if rest else '')}</td>")
            out.append("<tr>" + "".join(tds) + "</tr>")
        i += span
    return out + ["</table>", "</section>"]


def _card(c: Card) -> list[str]:
    cls = status_class(c.status)
    out = [f'<section id="{stage_id(c.name)}" class="card {cls}">',
           f"<h2>{html.escape(f'{c.name} ({c.status})')}</h2>"]
    if c.error:
        out.append(f'<p class="error">{inline(c.error)}</p>')
    out += ['<div class="body">', "<div>"]
    if c.facts:
        out.append("<p>" + " · ".join(inline(f) for f in c.facts) + "</p>")
    if c.paper:
        out += html_table(Table(["figure", "this run", "paper (Llama 2)"], c.paper))
    else:
        out.append('<p class="none">The paper gives no figure this stage reports.</p>')
    out.append("</div>")
    if c.plots:
        out.append(_img(f"{c.name}: {c.plots[0][0]}", c.plots[0][1]))
    out.append("</div>")
    if len(c.plots) > 1:
        out += [f"<details><summary>More plots ({len(c.plots) - 1})</summary>", '<div class="plots">']
        out += [_img(f"{c.name}: {name}", png) for name, png in c.plots[1:]] + ["</div>", "</details>"]
    if c.raw:
        out += [f"<details><summary>All figures ({len(c.raw)})</summary>",
                *html_table(Table(["figure", "value"], [list(r) for r in c.raw])), "</details>"]
    return out + ["</section>"]


def _details(parts: Sequence[Section]) -> list[str]:
    out = [f'<section id="{DETAILS_ID}"><h2>Lineage, paths and raw figures</h2>']
    for s in parts:
        out += [f"<details><summary>{html.escape(s.title)}</summary>", *section_body(s), "</details>"]
    return out + ["</section>"]


def page(title: str, subtitle: str, verdict: Verdict, did_text: str, did_rows: Sequence[tuple[str, Sequence[Any]]],
         cards: Sequence[Card], details: Sequence[Section]) -> str:
    """The whole page, in SECTIONS order with the cards between the table and the details."""
    names = {c.name for c in cards}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}\n{PAGE_CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", f'<p class="sub">{inline(subtitle)}</p>']
    out += _verdict(verdict, cards)
    out += _did(did_text, did_rows, names)
    for c in cards:
        out += _card(c)
    out += _details(details)
    return "\n".join(out + ["</body></html>", ""])
