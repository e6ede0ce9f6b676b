"""What a KFP component hands to the UI after its stage ran: small artifacts that point at the big data.

Stages write their outputs (shards, checkpoints, reports) to URLs themselves; a component only records those URLs
(artifact metadata, for lineage), the stage's numbers (Metrics), its Markdown report and its self-contained HTML
report (the one with the plots), so nothing large passes through KFP's artifact store.
"""
from __future__ import annotations

import json
import math
from typing import Any

from kubellama.components.core.io import report as reports
from kubellama.components.core.io import storage

# Metrics panels get unreadable past a few dozen entries; the full summary stays in the artifact file.
MAX_METRICS = 64


def scalars(summary: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a stage summary, with dotted keys (`tokens.total`), booleans and NaN left out."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _stage_report(summary: dict, url: str, ext: str) -> str | None:
    """The URL of the stage's report.<ext>: the one its summary names, else the one in its output folder."""
    path = summary.get(f"report_{ext}") or storage.join(url, f"report.{ext}")
    return path if storage.exists(path) else None


def report_markdown(url: str, summary: dict) -> str:
    """The stage's own report.md, or the summary as a code block when the stage wrote none."""
    path = _stage_report(summary, url, "md")
    if path:
        return storage.read_text(path)
    return "```json\n" + json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n```\n"


def report_html(url: str, summary: dict) -> str:
    """The stage's own report.html, or an HTML page of the summary when the stage wrote none."""
    path = _stage_report(summary, url, "html")
    if path:
        return storage.read_text(path)
    return reports.summary_html(f"Summary of {url}", summary)


def publish(summary: dict, url: str, artifact: Any, metrics: Any, report: Any, html: Any) -> str:
    """Record a finished stage on its KFP outputs (Dataset/Model, Metrics, Markdown, HTML) and return `url`."""
    artifact.metadata["url"] = url
    # Top-level strings are the stage's other URLs (HF export, reports, checkpoint): the UI shows them with lineage.
    for key, value in summary.items():
        if isinstance(value, str) and len(value) <= 1024 and key != "url":
            artifact.metadata[key] = value
    with open(artifact.path, "w") as f:
        json.dump({"url": url, "summary": summary}, f, indent=2, sort_keys=True, default=str)
    # The world's before/after figures first: they are what the run page and a reviewer read to see what the stage did.
    found = scalars(summary)
    ordered = sorted(found, key=lambda k: not (k.startswith("world.") and k.endswith((".before.value", ".after.value"))))
    for name, value in [(k, found[k]) for k in ordered][:MAX_METRICS]:
        metrics.log_metric(name, value)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(report_markdown(url, summary))
    with open(html.path, "w", encoding="utf-8") as f:
        f.write(report_html(url, summary))
    return url
