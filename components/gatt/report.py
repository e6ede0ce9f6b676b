"""The GAtt stage's report: the fine-tuning figures of the SFT body plus instruction adherence by turn, before and
after GAtt (a table per family, sample answers and a chart)."""
from __future__ import annotations

from typing import Any

from kubellama.components.core.io.report import Section, Table, to_png, write_report
from kubellama.components.core.train import finetune


def short(text: str, chars: int = 100) -> str:
    """One line of at most `chars` characters (a list item of the report)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars - 1] + "…"


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def figure(m: dict[str, Any] | None, when: str, signed: bool = False) -> str:
    """One before/after figure with its interval: "40% [25%, 57%]" (`signed`: a gap, "+10% [-5%, +25%]")."""
    x = (m or {}).get(when) or {}
    if x.get("value") is None:
        return "n/a"
    lo, hi = x["ci"]
    f = "+.0%" if signed else ".0%"
    return f"{x['value']:{f}} [{lo:{f}}, {hi:{f}}]"


def context(m: dict[str, Any] | None) -> str:
    d = (m or {}).get("turns_in_context_detail") or {}
    return " → ".join("n/a" if d.get(w) is None else f"{d[w]:.1f}" for w in ("before", "after"))


def by_turn_section(summary: dict[str, Any], turns: list[str]) -> Section | None:
    """Adherence, its control and their gap by turn, before → after, with 95% intervals and the turns in context."""
    figures = summary.get("adherence") or {}
    if not figures:
        return None
    rows = []
    for t in turns:
        a, c, g = (figures.get(f"{k}_turn_{t}") for k in ("adherence", "control", "gap"))
        rows.append([t, f"{figure(a, 'before')} → {figure(a, 'after')}",
                     f"{figure(c, 'before')} → {figure(c, 'after')}", f"{figure(g, 'before', True)} → {figure(g, 'after', True)}",
                     context(a), str((a or {}).get("n", 0))])
    text = (f"On {summary.get('adherence_source', 'held-out prompts')}, instructions with held-out values. Control: "
            "the same dialogs without the instruction, checked by the same rule; the gap (adherence minus control, "
            "a paired bootstrap over dialogs) is what GAtt should raise. 95% intervals (Wilson for rates). Turns in "
            "context: the mean number of dialog turns in the model's context when it answered (the middle ones "
            "dropped to fit; the instruction turn is always kept).")
    return Section("Adherence, control and gap by turn", text=text, tables=[Table(
        ["turn", "adherence before → after", "control before → after", "gap before → after",
         "turns in context before → after", "dialogs"], rows)])


def adherence_png(before: dict[str, float | None], after: dict[str, float | None]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, series, style in (("before GAtt", before, "o--"), ("after GAtt", after, "o-")):
        pts = [(int(t), v) for t, v in series.items() if v is not None]
        if pts:
            ax.plot([t for t, _ in pts], [v * 100 for _, v in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("turn")
    ax.set_ylabel("answers following the instruction (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("instruction adherence by turn")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def write(output: str, summary: dict[str, Any]) -> dict[str, str]:
    rows, sections, plots = finetune.report_parts(summary)
    before, after = summary["adherence_before"], summary["adherence_after"]
    turns = list(before or after)
    detail = summary["adherence_detail"]
    rows.append(("GAtt examples", (f"{summary['gatt_examples']} ({summary['answers']} answers; families "
                                  f"{', '.join(summary['families'])})")))
    if turns:
        rows += [("adherence before (turn: rate)", ", ".join(f"{t}: {rate(before.get(t))}" for t in turns)),
                 ("adherence after (turn: rate)", ", ".join(f"{t}: {rate(after.get(t))}" for t in turns))]
        control = {w: summary.get(f"control_{w}") or {} for w in ("before", "after")}
        if any(control.values()):
            rows += [(f"control {w} (turn: rate)", ", ".join(f"{t}: {rate(control[w].get(t))}" for t in turns))
                     for w in ("before", "after")]
        table = [["before", "all"] + [rate(before.get(t)) for t in turns],
                 ["after", "all"] + [rate(after.get(t)) for t in turns]]
        for when in ("before", "after"):
            for fam, rates in ((detail.get(when) or {}).get("by_family") or {}).items():
                table.append([when, fam] + [rate(rates.get(t)) for t in turns])
        text = (f"{(detail.get('before') or {}).get('dialogs', 0)} dialogs of held-out prompts; the instruction of a "
                f"checkable family ({', '.join(summary['adherence_families'])}) is in the first user turn only and "
                "the model's own answers feed the next turn. Share of answers that follow it, by turn.")
        if after and not any((after.get(t) or 0) > (before.get(t) or 0) for t in turns):
            text += (" Adherence did not rise in this run: a model this small, trained this briefly, has no room to "
                     "show the effect (the paper's Table 30 is on 70B). tests/test_gatt.py shows the rise on a tiny "
                     "model trained for it.")
        sections.insert(0, Section("Instruction adherence", text=text,
                                   tables=[Table(["model", "family", *(f"turn {t}" for t in turns)], table)]))
        examples = [f"`{e['instruction']}` turn {t}: {short(x['user'])} → {short(x['answer']) or '(empty)'}"
                    for e in (detail.get("after") or {}).get("examples", []) for t, x in e["turns"].items()]
        if examples:
            sections.insert(1, Section("Sample answers after GAtt", items=examples))
        by_turn = by_turn_section(summary, turns)
        if by_turn is not None:
            sections.insert(1, by_turn)
        plots["adherence"] = adherence_png(before, after)
    else:
        sections.insert(0, Section("Instruction adherence", text="No checkable family in gatt.families: no eval."))
    return write_report(output, "Ghost Attention", summary, rows=rows, sections=sections, plots=plots)
