"""The run's page: one HTML page (plus .md and .json) for a whole run, from the stages' own report.json files,
written to `<run.root>/<run.id>/report.html` (run_html.py renders it).

Stages are found through the registry and the run's folder: data prep's output (`safety_eval.data`), then every
`<run.root>/<run.id>/<folder>` holding a report.json, in registry order (a folder named after a stage with a
suffix, such as a second reward model's, sorts with its stage). The page opens on the verdict: the safety gate and
its failed lines, the final model, the stages' statuses and the cost (each training stage's measured device-hours
beside the ledger's estimate, core/tools/cost.py). Then what each stage did on the rule-checked world (before ->
after, 95% intervals), one card per stage (its figures beside the paper's where the paper has one, PAPER, and its
key plot), and, collapsed, the lineage, the paths and every stage's figures. SECTIONS and promised_sections name the
element ids the page carries.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.io.report import PNG_SIGNATURE, Section, Table, figure, markdown
from kubellama.components.core.model.llama import count_params
from kubellama.components.core.recipe.stages import STAGES
from kubellama.components.core.tools import cost
from kubellama.components.safety_eval import run_html
from kubellama.components.safety_eval.run_html import SECTIONS, Card, Verdict, stage_id

# (stage, key pattern) -> the paper's figure (Llama 2; section or table). Patterns match the flattened keys of a
# stage's report.json.
PAPER: dict[tuple[str, str], str] = {
    ("data_prep", "tokenizer.vocab_size"): "32,000 (§2.2)",
    ("data_prep", "pretrain.tokens"): "2T tokens (§2.2)",
    ("pretrain", "step"): "~500k steps of 4M tokens (§2.2)",
    ("pretrain", "lr"): "3e-4 peak, 7B/13B (Table 1)",
    ("sft", "examples"): "27,540 annotated examples (§3.1)",
    ("sft", "epochs"): "2 (§3.1)",
    ("gatt", "adherence_before*"): "turns 2/4/6/20: 100/10/0/0% (Table 30, without GAtt)",
    ("gatt", "adherence_after*"): "turns 2/4/6/20: 100/100/100/100% (Table 30)",
    ("reward", "accuracy"): "63.2% avg, helpfulness RM on Meta Helpful (Table 8)",
    ("reward", "accuracy_by_rating*"): "80.7 / 67.5 / 60.9 / 54.7 by rating (Table 8)",
    ("reward", "unsafe_recall_at_0_5"): "73.0 -> 90.4% at 0.5 with the safety auxiliary loss (Table 29)",
    ("reward", "unsafe_recall_at_rule"): "55% at 0.15, precision 89% (§3.2.3)",
    ("rejection_sampling", "temperature"): "1.2-1.3 best for 10-100 samples (§3.2.3)",
    ("ppo", "iterations"): "200-400 (§3.2.3)",
    ("ppo", "kl_*"): "beta = 0.01 (7B/13B), 0.005 (34B/70B) (§3.2.3)",
    ("safety_eval", "scores.truthfulqa.true_info_pct*"): "33.29 pretrained / 57.04 chat, 7B (Table 11, 14)",
    ("safety_eval", "scores.toxicity.toxic_pct*"): "21.25 pretrained / 0.00 chat, 7B (Table 11, 14)",
}
# Report keys that are plumbing, not figures (URLs, timestamps, what the lineage section shows).
SKIP = re.compile(r"^(status|benchmarks|report_\w+|plots|lineage|records|output|run_id|ended|metrics|tensorboard|"
                  r"checkpoints?|hf|"
                  r"run_page|generations|url|models|groups|gate\.lines|error|sources|.*sha256|.*\.url)$")
# The plot a stage's card shows beside its figures (the first one it has; else its first plot); the rest are
# collapsed under it.
KEY_PLOTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("loss",), "sft": ("heldout", "loss"), "gatt": ("adherence", "heldout"), "reward": ("calibration",),
    "rejection_sampling": ("reward_by_k", "heldout"), "ppo": ("reward",),
    "safety_eval": ("truthfulqa", "toxicity", "refusal"),
}
# A stage's own headline (label, before key, after key) for the table of what each stage did, where its report has
# no world figures (a run with data.world off): dotted keys into its report.json, without intervals.
HEADLINES: dict[str, tuple[str, str | None, str]] = {
    "data_prep": ("pretraining tokens", None, "pretrain.tokens"), "pretrain": ("training loss", None, "final_loss"),
    "sft": ("held-out loss", "heldout_loss_start", "heldout_loss_end"),
    "gatt": ("held-out loss", "heldout_loss_start", "heldout_loss_end"),
    "reward": ("held-out pair accuracy", None, "accuracy"),
    "rejection_sampling": ("held-out loss", "heldout_loss_start", "heldout_loss_end"),
    "ppo": ("mean reward", "reward_first", "reward_last"),
}


def _stage_of(folder: str) -> str | None:
    """The registry stage a run folder belongs to: its name, or the longest stage name it starts with."""
    names = sorted((s.name for s in STAGES), key=len, reverse=True)
    return next((n for n in names if folder == n or folder.startswith((n + "_", n + "-"))), None)


def reports(run_dir: str, data: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(folder name, registry stage or "", report.json) of the run, in pipeline order."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    if data and storage.exists(storage.join(data, "report.json")):
        found.append(("data_prep", "data_prep", storage.read_json(storage.join(data, "report.json"))))
    order = {s.name: i for i, s in enumerate(STAGES)}
    here = []
    for name in storage.listdir(run_dir) if storage.isdir(run_dir) else []:
        path = storage.join(run_dir, name, "report.json")
        if storage.exists(path):
            stage = _stage_of(name) or ""
            here.append((order.get(stage, len(order)), name, stage, storage.read_json(path)))
    found += [(name, stage, rep) for _, name, stage, rep in sorted(here, key=lambda t: (t[0], t[1]))]
    return found


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def figures(rep: dict[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(flattened key, value text) of a report's figures: scalars, small maps of scalars on one line, nested
    maps flattened up to three levels; URLs and plumbing left out."""
    out: list[tuple[str, str]] = []
    for key, v in rep.items():
        name = f"{prefix}{key}"
        if SKIP.match(name) or SKIP.match(str(key)):
            continue
        if isinstance(v, dict):
            if v and len(v) <= 8 and all(isinstance(x, (int, float, str, bool)) or x is None for x in v.values()):
                out.append((name, ", ".join(f"{k}: {_short(x)}" for k, x in v.items()
                                            if not (isinstance(x, str) and "/" in x))))
            elif depth < 2:
                out += figures(v, name + ".", depth + 1)
        elif isinstance(v, (bool, int, float)):
            out.append((name, _short(v)))
        elif isinstance(v, str) and "/" not in v and len(v) <= 80:
            out.append((name, v))
    return out


def paper(stage: str, key: str) -> str:
    return next((text for (s, pat), text in PAPER.items() if s == stage and fnmatch.fnmatch(key, pat)), "")


def _tokens(rep: dict[str, Any]) -> float | None:
    """Tokens a training stage processed: its report's `tokens`, else the last record of its metrics.jsonl."""
    if isinstance(rep.get("tokens"), (int, float)):
        return float(rep["tokens"])
    url = rep.get("metrics")
    if isinstance(url, str) and storage.exists(url):
        lines = storage.read_text(url).strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            if isinstance(last.get("tokens"), (int, float)):
                return float(last["tokens"])
    return None


def _hours(h: float) -> str:
    return f"{h:,.2f} h" if h >= 0.1 else f"{h * 3600:.3g} s"


Found = Sequence[tuple[str, str, dict[str, Any]]]


def _measured(rep: dict[str, Any]) -> float | None:
    """A stage's device-hours: its wall time times its processes."""
    wall = rep.get("wall_s")
    return wall * int(rep.get("world_size") or 1) / 3600 if isinstance(wall, (int, float)) else None


def _device(cfg: Any) -> str:
    return f"{cfg.cluster.gpus_per_node} GPUs/node" if cfg.cluster.gpus_per_node else "CPU processes"


def _cost_rows(cfg: Any, params: int, found: Found) -> list[list[Any]]:
    p = cfg.plan
    rows = []
    for name, _, rep in found:
        measured = _measured(rep)
        if measured is None:
            continue
        tokens = _tokens(rep)
        est = cost.estimate(params, tokens, p.gpu, p.mfu, p.gpu_power_w) if tokens else None
        rows.append([name, f"{_hours(measured)} ({_device(cfg)})", f"{tokens:,.0f}" if tokens else "-",
                     f"{_hours(est.gpu_hours)} on {est.gpu.name}, {est.tco2 * 1e6:.3g} gCO2eq" if est else "-"])
    return rows


def _change(m: dict[str, Any]) -> str:
    """Whether the 95% intervals of before and after are apart, and which way."""
    b, a = m.get("before") or {}, m.get("after") or {}
    if b.get("value") is None or a.get("value") is None:
        return "-"
    if a["ci"][0] > b["ci"][1]:
        return "rose"
    if a["ci"][1] < b["ci"][0]:
        return "fell"
    return "within noise"


def _world_rows(name: str, stage: str, rep: dict[str, Any]) -> list[list[Any]]:
    """A stage's rows of "what each stage did": [label, metric, before, after, n, change]."""
    world = rep.get("world") or {}
    if world and all(isinstance(m, dict) and "before" in m for m in world.values()):
        return [[name, metric, figure(m["before"]), figure(m["after"]), m.get("n"), _change(m)]
                for metric, m in world.items()]
    rows: list[list[Any]] = []
    if world and stage == "safety_eval":  # {model: {metric: figure}}; data prep's `world` is its counts
        gate = rep.get("gate_by_model") or {}
        for model, figs in world.items():
            rows += [[f"{name}: {model}", metric, "", figure(f), f.get("n"), ""]
                     for metric, f in figs.items() if metric in ("accuracy", "refusal_harmful", "false_refusal")]
            rows.append([f"{name}: {model}", "gate", "", "pass" if gate.get(model) else "fail", "", ""])
    return rows


def did(found: Found) -> Section | None:
    """"What each stage did": every stage's world figures, init → output, and the final models' safety figures."""
    rows = [r for name, stage, rep in found for r in _world_rows(name, stage, rep)]
    if not rows:
        return None
    return Section("What each stage did", text="Against the rule-checked world's held-out prompts (greedy answers "
                                               "checked by rule): before = the stage's init, after = its output, "
                                               "95% intervals; 'rose'/'fell' when the intervals do not overlap.",
                   tables=[Table(["stage", "metric", "before", "after", "n", "change"], rows)])


def _get(rep: dict[str, Any], dotted: str | None) -> Any:
    """The value at a dotted key of a report (None where any part is missing)."""
    v: Any = rep if dotted else None
    for part in (dotted or "").split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _headline_rows(name: str, stage: str, rep: dict[str, Any]) -> list[list[Any]]:
    """Where a stage has no world figures: its own headline (HEADLINES), or the gate's verdict for a safety eval."""
    if stage == "safety_eval":
        gate = rep.get("gate") or {}
        return [[name, f"gate for {rep.get('model')}", "", "pass" if gate.get("passed") else "fail", "", ""]] \
            if gate else []
    label, before, after = HEADLINES.get(stage, ("", None, ""))
    a = _get(rep, after)
    if not isinstance(a, (int, float)):
        return []
    b = _get(rep, before)
    return [[name, label, _short(b) if isinstance(b, (int, float)) else "", _short(a), "", ""]]


def stage_rows(found: Found) -> list[tuple[str, list[Any]]]:
    """The page's table of what each stage did: (run folder, [label, status, metric, before, after, n, change]),
    every stage of the run, by its world figures where it has them, else its own headline."""
    out: list[tuple[str, list[Any]]] = []
    for name, stage, rep in found:
        status = rep.get("status", "completed")
        rows = _world_rows(name, stage, rep) or _headline_rows(name, stage, rep) or [[name, "", "", "", "", ""]]
        out += [(name, [r[0], status, *r[1:]]) for r in rows]
    return out


def _plots(stage: str, rep: dict[str, Any]) -> list[tuple[str, bytes]]:
    """A stage's plots that are PNGs on storage, its key plot (KEY_PLOTS) first."""
    found = []
    for plot, url in (rep.get("plots") or {}).items():
        if isinstance(url, str) and storage.exists(url):
            png = storage.read_bytes(url)
            if png.startswith(PNG_SIGNATURE):
                found.append((plot, png))
    key = next((k for k in KEY_PLOTS.get(stage, ()) if k in dict(found)), None)
    return sorted(found, key=lambda p: p[0] != key)


def card(name: str, stage: str, rep: dict[str, Any]) -> Card:
    """A stage's card: the figures the paper also gives, beside the paper's; its plots; every figure, for the raw
    view."""
    raw = figures(rep)
    facts = []
    if isinstance(rep.get("wall_s"), (int, float)):
        n = int(rep.get("world_size") or 1)
        facts.append(f"took {_hours(rep['wall_s'] / 3600)} on {n} process{'es' if n > 1 else ''}")
    if isinstance(rep.get("step"), int):
        facts.append(f"{rep['step']:,} steps")
    return Card(name, str(rep.get("status", "completed")), str(rep.get("error") or ""), facts,
                [[k, v, paper(stage, k)] for k, v in raw if paper(stage, k)], _plots(stage, rep), raw)


def verdict(cfg: Any, found: Found) -> Verdict:
    """The gate (the run's safety eval's, with its failed lines), the final model, the stages' statuses, the cost."""
    evals = [(n, rep) for n, stage, rep in found if stage == "safety_eval"]
    ev = next((r for n, r in evals if n == "safety_eval"), evals[-1][1] if evals else {})
    gate = ev.get("gate") or {}
    failed = [(ln.get("rule", ""), ln.get("detail", "")) for ln in gate.get("lines", []) if ln.get("status") == "fail"]
    bad = [(n, rep) for n, _, rep in found if rep.get("status", "completed") != "completed"]
    model = str(ev.get("model") or "")
    if gate:
        ok: bool | None = bool(gate.get("passed"))
        lines = len(gate.get("lines", []))
        text = f"({gate.get('mode')}) for {model}: {lines - len(failed)} of {lines} lines pass"
        headline = (f"{model} passes the safety gate" if ok else
                    f"{model} fails the safety gate: {len(failed)} of {lines} lines"
                    + (" (report mode: not enforced)" if gate.get("mode") == "report" else ""))
    else:
        # No gate to read: the final model is the run's last stage with weights.
        ok = None
        text = f"not evaluated: {ev['error']}" if ev.get("error") else "not evaluated: no safety eval in this run"
        model = next((n for n, _, rep in reversed(found) if rep.get("hf") or rep.get("checkpoint")), "")
        headline = f"The run failed at {bad[0][0]}" if bad else "Not gated: no safety eval in this run"
    done = sum(1 for _, _, rep in found if rep.get("status", "completed") == "completed")
    stages = f"{done} of {len(found)} completed" + (
        "; " + ", ".join(f"{n} {rep.get('status')}" for n, rep in bad) if bad else "")
    params = count_params(cfg.model)
    p = cfg.plan
    c = cost.estimate(params, p.tokens, p.gpu, p.mfu, p.gpu_power_w)
    hours = [h for _, _, rep in found if (h := _measured(rep)) is not None]
    paper_cost = (f" (Table 2: {cost.TABLE2[cfg.model.name][0]:,} GPU-hours, {cost.TABLE2[cfg.model.name][1]} tCO2eq)"
                  if cfg.model.name in cost.TABLE2 else "")
    cost_text = (f"{_hours(sum(hours))} measured over {len(hours)} stages ({_device(cfg)}). At the paper's scale, "
                 f"{cfg.model.name} on {p.tokens:.3g} tokens: {c.gpu_hours:,.0f} GPU-hours, {c.tco2:,.2f} tCO2eq on "
                 f"{c.gpu.name} at {c.mfu * 100:.1f}% MFU (`plan.*`){paper_cost}.")
    cost_table = Table(["stage", "measured", "tokens", "estimate"], _cost_rows(cfg, params, found))
    return Verdict(headline, ok, text, failed, model, stages, cost_text, cost_table, c.gpu_hours, c.tco2, bool(bad))


def details(run_dir: str, found: Found) -> list[Section]:
    """The collapsed part: lineage hashes and paths of every stage."""
    lineage, paths = [], [["run folder", f"`{run_dir}`", ""]]
    for name, stage, rep in found:
        lin = rep.get("lineage") or {}
        lineage.append([name, *[f"`{lin[k]}`" if lin.get(k) else "-" for k in ("config_hash", "data_hash", "parent")]])
        weights = rep.get("hf") or rep.get("checkpoint") or (rep.get("output") if stage == "data_prep" else None)
        paths.append([name, f"`{weights}`" if weights else "-",
                      f"`{rep['report_html']}`" if isinstance(rep.get("report_html"), str) else "-"])
    return [Section("Lineage", text="Each stage's config hash, data hash and the checkpoint it started from.",
                    tables=[Table(["stage", "config hash", "data hash", "parent"], lineage)]),
            Section("Paths", tables=[Table(["stage", "weights / data", "its own page"], paths)])]


def promised_sections(report: dict[str, Any]) -> list[str]:
    """The element ids the run's page carries, from the run page's report.json: the verdict, the table of what each
    stage did, a card per stage and the details."""
    return [SECTIONS[0], SECTIONS[1], *[stage_id(n) for n in report.get("order") or report.get("stages") or {}],
            SECTIONS[2]]


def write(cfg: Any, run_dir: str) -> dict[str, str]:
    """Write the run's page from the stages' reports; returns the URLs of report.{json,md,html}."""
    found = reports(run_dir, cfg.safety_eval.data)
    v = verdict(cfg, found)
    cards = [card(name, stage, rep) for name, stage, rep in found]
    rows = stage_rows(found)
    more = details(run_dir, found)
    did_text = ("On the rule-checked world's held-out prompts (greedy answers checked by rule): before = the stage's "
                "init, after = its output, 95% intervals, n prompts; 'rose'/'fell' when the intervals do not overlap. "
                "A stage without world figures shows its own headline figure, without an interval.")
    title = f"Run {cfg.run.id}"
    html = run_html.page(title, f"{cfg.model.name} · {len(found)} stages · run `{cfg.run.id}`", v, did_text, rows,
                         cards, more)
    summary = {"status": "failed" if any(c.status != "completed" for c in cards) else "completed",
               "run_id": cfg.run.id, "run_dir": run_dir,
               "stages": {c.name: {"status": c.status, **({"error": c.error} if c.error else {})} for c in cards},
               "order": [c.name for c in cards],  # pipeline order (the JSON's maps are written with sorted keys)
               "gate": {"passed": v.gate_ok, "lines_failed": [list(x) for x in v.failed_lines]},
               "final_model": v.final_model, "estimate_gpu_hours": v.estimate_gpu_hours,
               "estimate_tco2": v.estimate_tco2}
    md_sections = [Section("Verdict", text=v.headline, items=[f"safety gate: {v.gate}", *[
        f"failed: {r}: {d}" for r, d in v.failed_lines], f"final model: {v.final_model or '-'}",
        f"stages: {v.stages}", f"cost: {v.cost}"]),
        Section("What each stage did", text=did_text, tables=[Table(list(run_html.DID_HEADER), [r for _, r in rows])]),
        *[Section(f"{c.name} ({c.status})", text=c.error, tables=[Table(["figure", "this run", "paper (Llama 2)"],
                                                                         c.paper)] if c.paper else [])
          for c in cards],
        *([Section("Cost by stage", tables=[v.cost_table])] if v.cost_table else []), *more]
    paths = {k: storage.join(run_dir, f"report.{k}") for k in ("json", "md", "html")}
    storage.write_text(paths["md"], markdown(title, [("run", f"`{cfg.run.id}`"), ("model", cfg.model.name)],
                                             md_sections, [f"{c.name}-{p}" for c in cards for p, _ in c.plots]))
    storage.write_text(paths["html"], html)
    # Last: a reader waiting on report.json finds the page already there.
    storage.write_json(paths["json"], {**summary, "report_json": paths["json"], "report_md": paths["md"],
                                       "report_html": paths["html"], "sections": promised_sections(summary)})
    return paths
