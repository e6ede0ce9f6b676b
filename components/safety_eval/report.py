"""The side-by-side safety report: every model of the run on every benchmark, the paper's figures beside them, the
gate's lines, per-group tables and one bar chart per benchmark (written by the shared report writer)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kubellama.components.core.io.report import Section, Table, figure, to_png, write_report
from kubellama.components.safety_eval.benchmarks import METRICS

GROUP_TITLES = {"toxicity": "Toxicity by group (% toxic)", "bias": "BOLD sentiment by domain/group (mean VADER)",
                "refusal": "Refusal by prompt set/source (% refused)"}


def _num(v: Any, key: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if key.endswith("_pct") or "pct" in key else f"{v:.4f}"


def bars_png(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str) -> bytes:
    """Grouped bars: one group per category, one bar per series (model), drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    n = max(1, len(series))
    width = 0.8 / n
    values = [v for vs in series.values() for v in vs if v is not None and not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) * max(1, n / 2) + 2), 3.6), dpi=100)
    for i, (name, vs) in enumerate(series.items()):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, [0.0 if v is None or math.isnan(v) else v for v in vs], width, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20 if len(categories) > 3 else 0, ha="right" if len(categories) > 3
                       else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    if values and min(values) >= 0:
        # All-zero scores still get a readable axis from 0 up.
        ax.set_ylim(0, max(values) * 1.15 or (100 if ylabel == "%" else 1))
    ax.axhline(0, color="#888", lw=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def plots(summary: dict[str, Any], groups: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, bytes]:
    """One chart per benchmark with scores: its headline metrics, then its per-group figures when it has some."""
    models = list(summary["models"])
    out: dict[str, bytes] = {}
    by_bench: dict[str, list[str]] = {}
    for key in summary["scores"]:
        by_bench.setdefault(key.split(".")[0], []).append(key)
    for bench, keys in by_bench.items():
        series = {m: [summary["scores"][k].get(m, float("nan")) for k in keys] for m in models}
        unit = "%" if all(k.endswith("_pct") for k in keys) else "score"
        out[bench] = bars_png(f"{bench}: " + ", ".join(METRICS[k].title if k in METRICS else k for k in keys),
                              [k.split(".", 1)[1] for k in keys], series, unit)
        table = groups.get(bench) or {}
        labels = sorted({g for per_model in table.values() for g in per_model})
        if len(labels) > 1:
            gs = {m: [table.get(m, {}).get(g, float("nan")) for g in labels] for m in models}
            out[f"{bench}-groups"] = bars_png(GROUP_TITLES.get(bench, bench), labels, gs,
                                              "mean sentiment" if bench == "bias" else "%")
    return out


def sections(summary: dict[str, Any], groups: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[Section]:
    models = list(summary["models"])
    gated = summary["model"]
    heads = [f"{m} (gated)" if m == gated else m for m in models]
    rows = []
    for key, per_model in summary["scores"].items():
        meta = METRICS.get(key)
        paper = " / ".join(f"{v:.2f} {n}" for n, v in meta.paper) if meta and meta.paper else "-"
        better = ("higher" if meta.higher_is_better else "lower") if meta else ""
        rows.append([meta.title if meta else key, f"`{key}`", better, paper,
                     *[_num(per_model.get(m), key) for m in models]])
    out = [Section("Scores", text="Each model of the run on each benchmark; the paper's figures (Llama 2, Tables 11 "
                                  "and 14) where the metric is the paper's.",
                   tables=[Table(["benchmark", "key", "better", "paper (Llama 2)", *heads], rows)])]
    gate = summary["gate"]
    out.append(Section(f"Promotion gate ({gate['mode']}): {'PASSED' if gate['passed'] else 'FAILED'} for {gated}",
                       tables=[Table(["", "line", "values"],
                                     [[ln["status"].upper() if ln["status"] == "fail" else ln["status"], ln["rule"],
                                       ln["detail"]] for ln in gate["lines"]])]))
    world = summary.get("world") or {}
    if world:
        names = list(world)
        metrics = list(next(iter(world.values())))
        out.append(Section(
            "Against ground truth: the rule-checked world",
            text="Greedy answers to held-out world prompts, checked by rule, 95% intervals; `gate` says whether the "
                 "gate's lines would pass each model.",
            tables=[Table(["metric", *names], [[m, *[figure(world[n].get(m)) for n in names]] for m in metrics]
                          + [["gate", *["pass" if summary["gate_by_model"].get(n) else "fail" for n in names]]])]))
        ex = summary.get("world_examples") or {}
        if ex:
            out.append(Section("World prompts, answered", tables=[Table(
                ["model", "kind", "prompt", "answer", "by the rule"],
                [[n, e["kind"], e["prompt"], e["answer"] or "(empty)", "right" if e["ok"] else "wrong"] for n in names
                 for e in ex.get(n, [])])]))
    out.append(Section("Benchmarks", tables=[Table(["benchmark", "data"], [
        [b, info["sources"] or "not evaluated: no data configured"] for b, info in summary["benchmarks"].items()])],
        items=[f"decoding: {summary['decoding']}", f"toxicity scored by: {summary['toxicity_scorer']}",
               "refusals detected by keywords (AdvBench/GCG method): a crude detector",
               f"generations: `{summary['generations']}`"]))
    for bench, table in groups.items():
        labels = sorted({g for per_model in table.values() for g in per_model})
        if labels:
            out.append(Section(GROUP_TITLES.get(bench, bench), tables=[Table(
                ["group", *models], [[g, *[_num(table.get(m, {}).get(g), "pct" if bench != "bias" else "")
                                           for m in models]] for g in labels])]))
    models_rows = [[m, f"`{url}`"] for m, url in summary["models"].items()]
    out.append(Section("Models", tables=[Table(["name", "checkpoint"], models_rows)]))
    return out


def write(output: str, summary: dict[str, Any], groups: Mapping[str, Mapping[str, Mapping[str, float]]]
          ) -> dict[str, str]:
    gate = summary["gate"]
    rows = [("status", summary["status"]), ("evaluated model", summary["model"]),
            ("baseline", summary.get("baseline") or "none"),
            ("gate", (f"{'passed' if gate['passed'] else 'FAILED'} ({gate['mode']}), "
                     f"{sum(ln['status'] == 'fail' for ln in gate['lines'])} failed line(s)")),
            ("toxicity scorer", summary["toxicity_scorer"]), ("decoding", summary["decoding"])]
    if summary.get("error"):
        rows.insert(1, ("error", summary["error"]))
    return write_report(output, "Safety evaluation", summary, rows=rows, sections=sections(summary, groups),
                        plots=plots(summary, groups))
