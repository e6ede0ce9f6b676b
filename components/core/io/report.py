"""The one report writer of every stage: report.json (the summary without per-step records, always a `status`,
written last so a waiting launcher reads it as complete), report.md (tables only: the KFP UI cannot resolve image
links) and a self-contained report.html (every plot a PNG data URI, nothing fetched). In text, `backticks` mark code;
both renderings escape the rest.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kubellama.components.core.io import storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINEAGE_LABELS = {"config_hash": "config hash", "data_hash": "data manifest hash", "parent": "parent checkpoint"}
WORLD_TITLE = "Against ground truth: the rule-checked world"
# The element ids of a stage's report.html that a test may rely on (promised_sections says which a report has):
# the headline table, the lineage, the world's figures and the plots. Any other section gets `section-<its title>`.
SUMMARY_ID, LINEAGE_ID, WORLD_ID, PLOTS_ID = "summary", "lineage", "world", "plots"
# By title, so a stage that builds its own world section (safety eval's, by model) gets the same id.
_FIXED_IDS = {"Lineage": LINEAGE_ID, WORLD_TITLE: WORLD_ID}
_SLUG = re.compile(r"[^a-z0-9]+")
_CODE = re.compile(r"`([^`]+)`")
_PLOT_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Section:
    """A titled part of a report: a paragraph, then tables, then a bullet list (each optional)."""
    title: str
    text: str = ""
    tables: Sequence[Table] = field(default_factory=list)
    items: Sequence[str] = field(default_factory=list)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def to_png(fig: Any) -> bytes:
    """A matplotlib Figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def line_png(xs: Sequence[float], ys: Sequence[float], *, title: str, xlabel: str, ylabel: str) -> bytes:
    """One line plot as PNG bytes, drawn off-screen (Agg: pods and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(list(xs), list(ys), lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return to_png(fig)


def loss_png(records: Sequence[dict[str, Any]], title: str = "training loss") -> bytes | None:
    """Loss against step from a trainer's metric records; None when there is nothing to plot."""
    if not records:
        return None
    return line_png([r["step"] for r in records], [r["loss"] for r in records], title=title, xlabel="step",
                    ylabel="loss")


def training_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The headline of a training stage's summary (Trainer.fit's keys; figures from its last metric record)."""
    last = (summary.get("records") or [{}])[-1]
    mfu = last.get("mfu")
    return [("steps", summary.get("step")), ("started at step", summary.get("start_step")),
            ("final loss", f"{last['loss']:.4f}" if "loss" in last else "n/a"),
            ("tokens/s (total)", f"{last['tokens_per_s']:.0f}" if "tokens_per_s" in last else "n/a"),
            ("MFU", f"{mfu * 100:.1f}%" if mfu is not None else "n/a (no GPU peak)"),
            ("peak memory", f"{last['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in last else "n/a"),
            ("checkpoint", summary.get("checkpoint")), ("metrics", summary.get("metrics")),
            ("HF export", summary.get("hf"))]


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """Top-level scalars of a summary (what a stage without its own rows shows)."""
    return [(k, v) for k, v in summary.items() if k not in ("status", "lineage") and
            (v is None or isinstance(v, (str, int, float, bool)))]


def _headline(summary: dict[str, Any], rows: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    if rows is None:
        rows = training_rows(summary) if "records" in summary else summary_rows(summary)
    rows = list(rows)
    if not any(k == "status" for k, _ in rows):
        rows.insert(0, ("status", summary.get("status", "completed")))
    return rows


def _lineage(summary: dict[str, Any]) -> Section | None:
    lineage = summary.get("lineage")
    if not isinstance(lineage, dict):
        return None
    rows = [[LINEAGE_LABELS.get(k, k), f"`{v}`" if v else "none"] for k, v in lineage.items()]
    return Section("Lineage", tables=[Table(["", ""], rows)])


# Markdown ---------------------------------------------------------------------------------------------------------

def _md_cell(value: Any) -> str:
    # A pipe would end the cell and a newline the row.
    return cell(value).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows] + [""]


def markdown(title: str, rows: Sequence[tuple[str, Any]], sections: Sequence[Section],
             plots: Sequence[str] = ()) -> str:
    out = [f"# {title}", ""] + _md_table(Table(["", ""], rows))
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        for t in s.tables:
            out += _md_table(t)
        if s.items:
            out += [f"- {item}" for item in s.items] + [""]
    if plots:
        out += [(f"Plots ({', '.join(plots)}) are embedded in `report.html` beside this file (the HTML artifact in "
                "the KFP UI)."), ""]
    return "\n".join(out)


# HTML -------------------------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:60em;
color:#1f2328;padding:0 1em}h1{font-size:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.5em}table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #d0d7de;padding:.3em .7em;text-align:left;vertical-align:top}th{background:#f6f8fa}
code{background:#f6f8fa;padding:.1em .3em;border-radius:4px;font-size:90%;word-break:break-all}
figure{margin:1em 0}img{max-width:100%}pre{background:#f6f8fa;padding:1em;overflow-x:auto}"""


def inline(text: Any) -> str:
    """Escaped HTML of plain text with `code` spans (escaping first: a backtick is never escaped)."""
    return _CODE.sub(r"<code>\1</code>", html.escape(cell(text)))


def html_table(t: Table) -> list[str]:
    out = ["<table>"]
    if any(h for h in t.header):
        out.append("<tr>" + "".join(f"<th>{inline(h)}</th>" for h in t.header) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in t.rows]
    return out + ["</table>"]


def section_body(s: Section) -> list[str]:
    """A section's paragraph, tables and list as HTML lines (its heading and wrapper are the caller's)."""
    out = [f"<p>{inline(s.text)}</p>"] if s.text else []
    for t in s.tables:
        out += html_table(t)
    if s.items:
        out += ["<ul>"] + [f"<li>{inline(i)}</li>" for i in s.items] + ["</ul>"]
    return out


def section_id(title: str, taken: set[str]) -> str:
    """The element id of a section titled `title`, unique among `taken` (which it joins): a fixed one for the
    sections promised_sections names, else `section-<slug of the title>`."""
    base = _FIXED_IDS.get(title) or "section-" + (_SLUG.sub("-", title.lower()).strip("-") or "untitled")
    sid, n = base, 2
    while sid in taken:
        sid, n = f"{base}-{n}", n + 1
    taken.add(sid)
    return sid


def html_page(title: str, rows: Sequence[tuple[str, Any]], sections: Sequence[Section],
              pngs: dict[str, bytes] | None = None, pre: str = "") -> str:
    """A complete HTML document: nothing in it loads from elsewhere (plots are data URIs). Each part is a
    `<section>` with an id (section_id; promised_sections says which ones a report's page carries)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    taken = {SUMMARY_ID, PLOTS_ID}
    out += [f'<section id="{SUMMARY_ID}">', *html_table(Table(["", ""], rows)), "</section>"]
    for s in sections:
        out += [f'<section id="{section_id(s.title, taken)}"><h2>{html.escape(s.title)}</h2>', *section_body(s),
                "</section>"]
    if pngs:
        out.append(f'<section id="{PLOTS_ID}"><h2>Plots</h2>')
        for name, png in pngs.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(name)}</figcaption></figure>")
        out.append("</section>")
    if pre:
        out.append(f"<pre>{html.escape(pre)}</pre>")
    return "\n".join(out + ["</body></html>", ""])


def _world_kind(world: Any) -> str:
    """"before_after" (a stage's world: metric -> {before, after, n}), "by_model" (safety eval's: model ->
    metric -> figure) or "" (none, or data prep's counts)."""
    if not isinstance(world, dict) or not world or not all(isinstance(m, dict) for m in world.values()):
        return ""
    if all("before" in m for m in world.values()):
        return "before_after"
    if all(isinstance(f, dict) and "value" in f for m in world.values() for f in m.values()):
        return "by_model"
    return ""


def promised_sections(report: dict[str, Any]) -> list[str]:
    """The element ids a stage's report.html carries, from its report.json: the headline table always, the
    lineage when the report has one, the world's figures when it has them, the plots when it has any."""
    out = [SUMMARY_ID]
    if isinstance(report.get("lineage"), dict):
        out.append(LINEAGE_ID)
    if _world_kind(report.get("world")):
        out.append(WORLD_ID)
    if report.get("plots"):
        out.append(PLOTS_ID)
    return out


def summary_html(title: str, summary: dict[str, Any]) -> str:
    """A stage summary as an HTML page, for a stage that wrote no report.html."""
    lineage = _lineage(summary)
    return html_page(title, _headline(summary, summary_rows(summary)), [lineage] if lineage else [],
                     pre=json.dumps(summary, indent=2, sort_keys=True, default=str))


def figure(f: dict[str, Any] | None) -> str:
    """A world figure as "value [lo, hi]"."""
    if not f or f.get("value") is None:
        return "n/a"
    lo, hi = f["ci"]
    return f"{f['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def world_section(world: dict[str, Any]) -> Section:
    """The rule-checked world's before/after figures (init → output), 95% intervals."""
    rows = [[name, figure(m.get("before")), figure(m.get("after")), m.get("n"),
             ", ".join(f"{k}: {cell(v)}" for k, v in m.items() if k not in ("before", "after", "n"))]
            for name, m in world.items()]
    return Section(WORLD_TITLE,
                   text="Held-out world prompts (greedy answers) or pairs (scores), checked by rule; before = this stage's init, "
                        "after = its output; 95% intervals (Wilson for rates, bootstrap for means).",
                   tables=[Table(["metric", "before", "after", "n", "notes"], rows)])


# The writer -------------------------------------------------------------------------------------------------------

def write_report(output: str, title: str, summary: dict[str, Any], *,
                 rows: Sequence[tuple[str, Any]] | None = None, sections: Sequence[Section] | None = None,
                 plots: dict[str, bytes | Any] | None = None) -> dict[str, str]:
    """Write `<output>/report.{json,md,html}` and `<output>/<plot>.png`; returns their URLs by `json`, `md`,
    `html` and `<plot>.png`.

    `rows`: the headline table (`status` is added when missing). `plots`: name -> PNG bytes or a matplotlib Figure.
    Without `rows` and `plots`, a summary with per-step `records` (a training stage's) gets the training headline
    and the loss plot; any other summary gets its top-level scalars and no plot.
    """
    records = summary.get("records") or []
    if plots is None:
        png = loss_png(records, f"{title}: loss")
        plots = {"loss": png} if png else {}
    pngs = {name: value if isinstance(value, bytes) else to_png(value) for name, value in plots.items()}
    for name, png in pngs.items():
        if not _PLOT_NAME.fullmatch(name):
            raise ValueError(f"plot name {name!r}: letters, digits, '_' and '-' only (it names a file)")
        if not png.startswith(PNG_SIGNATURE):
            raise ValueError(f"plot {name!r} is not a PNG")
    head = _headline(summary, rows)
    lineage = _lineage(summary)
    parts = ([lineage] if lineage else []) + list(sections or [])
    if _world_kind(summary.get("world")) == "before_after":
        parts.append(world_section(summary["world"]))

    paths = {"json": storage.join(output, "report.json"), "md": storage.join(output, "report.md"),
             "html": storage.join(output, "report.html")}
    plot_urls = {name: storage.join(output, f"{name}.png") for name in pngs}
    for name, png in pngs.items():
        storage.write_bytes(plot_urls[name], png)
    storage.write_text(paths["md"], markdown(title, head, parts, list(pngs)))
    storage.write_text(paths["html"], html_page(title, head, parts, pngs))
    body = {k: v for k, v in summary.items() if k != "records"}
    body.setdefault("status", dict(head)["status"])
    body.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"], plots=plot_urls)
    storage.write_json(paths["json"], body)
    return {**paths, **{f"{name}.png": url for name, url in plot_urls.items()}}
