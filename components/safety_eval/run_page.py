"""The run's page: one HTML page (plus .md and .json) for a whole run, from the stages' own report.json files.

Stages are found through the registry and the run's folder: data prep's output (`safety_eval.data`), then every
`<run.root>/<run.id>/<folder>` holding a report.json, in registry order (a folder named after a stage with a
suffix, such as a second reward model's, sorts with its stage). For each: its status, key figures beside the
paper's where the paper has one (PAPER, from the recipe's reference numbers), its plots re-embedded, and its
lineage. Then the cost: each training stage's measured device-hours beside the ledger's estimate for the tokens it
trained on (core/tools/cost.py). Written by the shared report writer to `<run.root>/<run.id>/report.html`.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, figure, write_report
from kubellama.components.core.model.llama import count_params
from kubellama.components.core.recipe.stages import STAGES
from kubellama.components.core.tools import cost

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
MAX_ROWS = 24
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


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


def _cost_rows(cfg: Any, params: int, found: list[tuple[str, str, dict[str, Any]]]) -> list[list[Any]]:
    p = cfg.plan
    device = f"{cfg.cluster.gpus_per_node} GPUs/node" if cfg.cluster.gpus_per_node else "CPU processes"
    rows = []
    for name, _, rep in found:
        wall = rep.get("wall_s")
        if not isinstance(wall, (int, float)):
            continue
        measured = wall * int(rep.get("world_size") or 1) / 3600
        tokens = _tokens(rep)
        est = cost.estimate(params, tokens, p.gpu, p.mfu, p.gpu_power_w) if tokens else None
        rows.append([name, f"{_hours(measured)} ({device})", f"{tokens:,.0f}" if tokens else "-",
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


def did(found: list[tuple[str, str, dict[str, Any]]]) -> Section | None:
    """"What each stage did": every stage's world figures, init → output, and the final models' safety figures."""
    rows = []
    for name, stage, rep in found:
        world = rep.get("world") or {}
        if world and all(isinstance(m, dict) and "before" in m for m in world.values()):
            rows += [[name, metric, figure(m["before"]), figure(m["after"]), m.get("n"), _change(m)]
                     for metric, m in world.items()]
        elif world and stage == "safety_eval":  # {model: {metric: figure}}; data prep's `world` is its counts
            gate = rep.get("gate_by_model") or {}
            for model, figs in world.items():
                rows += [[f"{name}: {model}", metric, "", figure(f), f.get("n"), ""]
                         for metric, f in figs.items() if metric in ("accuracy", "refusal_harmful", "false_refusal")]
                rows.append([f"{name}: {model}", "gate", "", "pass" if gate.get(model) else "fail", "", ""])
    if not rows:
        return None
    return Section("What each stage did", text="Against the rule-checked world's held-out prompts (greedy answers "
                                               "checked by rule): before = the stage's init, after = its output, "
                                               "95% intervals; 'rose'/'fell' when the intervals do not overlap.",
                   tables=[Table(["stage", "metric", "before", "after", "n", "change"], rows)])


def write(cfg: Any, run_dir: str) -> dict[str, str]:
    """Write the run's page from the stages' reports; returns the URLs of report.{json,md,html}."""
    found = reports(run_dir, cfg.safety_eval.data)
    sections: list[Section] = []
    pngs: dict[str, bytes] = {}
    lineage_rows = []
    overview = []
    for name, stage, rep in found:
        status = rep.get("status", "completed")
        # The figures the paper also gives first, then the rest, up to MAX_ROWS.
        rows = sorted(([k, v, paper(stage, k) or "-"] for k, v in figures(rep)), key=lambda r: r[2] == "-")
        rows = rows[:MAX_ROWS]
        items = [f"report: `{rep[k]}`" for k in ("report_html",) if isinstance(rep.get(k), str)]
        if rep.get("error"):
            items.insert(0, f"error: {rep['error']}")
        sections.append(Section(f"{name} ({status})", tables=[Table(["figure", "this run", "paper (Llama 2)"], rows)],
                                items=items))
        for plot, url in (rep.get("plots") or {}).items():
            if isinstance(url, str) and storage.exists(url):
                pngs[_NAME.sub("_", f"{name}-{plot}")] = storage.read_bytes(url)
        lin = rep.get("lineage") or {}
        weights = rep.get("hf") or rep.get("checkpoint") or (rep.get("output") if stage == "data_prep" else None)
        lineage_rows.append([name, f"`{lin.get('config_hash')}`" if lin.get("config_hash") else "-",
                             f"`{lin.get('data_hash')}`" if lin.get("data_hash") else "-",
                             f"`{lin['parent']}`" if lin.get("parent") else "-",
                             f"`{weights}`" if weights else "-"])
        overview.append([name, status, rep.get("error") or ""])
    model = cfg.model
    params = count_params(model)
    c = cost.estimate(params, cfg.plan.tokens, cfg.plan.gpu, cfg.plan.mfu, cfg.plan.gpu_power_w)
    cost_section = Section(
        "Cost", text=f"Measured time of each stage beside the cost ledger's estimate for the tokens it trained on "
                     f"({c.gpu.name} at {c.mfu * 100:.1f}% MFU, `plan.*`). At the paper's scale, {model.name} on "
                     f"{cfg.plan.tokens:.3g} tokens: {c.gpu_hours:,.0f} GPU-hours, {c.tco2:,.2f} tCO2eq"
                     + (f" (Table 2: {cost.TABLE2[model.name][0]:,} GPU-hours, {cost.TABLE2[model.name][1]} tCO2eq)."
                        if model.name in cost.TABLE2 else "."),
        tables=[Table(["stage", "measured", "tokens", "estimate"], _cost_rows(cfg, params, found))])
    failed = [n for n, s, _ in overview if s not in ("completed",)]
    summary = {"status": "failed" if failed else "completed", "run_id": cfg.run.id, "run_dir": run_dir,
               "stages": {n: {"status": s, **({"error": e} if e else {})} for n, s, e in overview},
               "estimate_gpu_hours": c.gpu_hours, "estimate_tco2": c.tco2}
    head = [("run", f"`{cfg.run.id}`"), ("folder", f"`{run_dir}`"), ("model", model.name),
            ("stages", " -> ".join(f"{n} ({s})" for n, s, _ in overview) or "none found")]
    table = did(found)
    parts = [*([table] if table else []), Section("Lineage", tables=[Table(["stage", "config hash", "data hash", "parent", "weights / data"],
                                              lineage_rows)]), *sections, cost_section]
    return write_report(run_dir, f"Run {cfg.run.id}", summary, rows=head, sections=parts, plots=pngs)
