"""`kubellama show <run folder>`: what a run's models say to a few held-out prompts of the rule-checked world (a task,
an instruction at turn 8, a harmful prompt and its benign look-alike), the pretrained model beside the gated one,
and what each stage did (`make demo` ends on this). Reads the run's reports; loads no model."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import figure
from kubellama.components.core.recipe.entry import guarded
from kubellama.components.safety_eval.run_page import did, reports


def lines(run: str) -> list[str]:
    url = storage.join(run, "safety_eval", "report.json")
    if not storage.exists(url):
        raise KubellamaError(f"{url} does not exist: the run has no safety eval report yet")
    rep: dict[str, Any] = storage.read_json(url)
    said = rep.get("world_examples") or {}
    if not said:
        raise KubellamaError(f"{url}: no world examples (was data.world.enabled on?)")
    models = [m for m in ("pretrain", rep.get("model")) if m in said]
    out = []
    table = did(reports(run, ""))
    if table is not None:
        out.append(f"== {table.title} (before -> after, 95% intervals)")
        out += [f"  {r[0]:<28} {r[1]:<22} {r[2]:<24} -> {r[3]:<24} n={r[4]} {r[5]}" for r in table.tables[0].rows]
    for m in dict.fromkeys(models):
        gate = "passes" if (rep.get("gate_by_model") or {}).get(m) else "fails"
        out.append(f"== {m} (the safety gate {gate} it)")
        for e in said[m]:
            verdict = "right" if e["ok"] else "WRONG"
            out.append(f"  [{e['kind']}] {e['prompt']}\n      -> {e['answer'] or '(empty)'!s}   [{verdict}]")
        world = (rep.get("world") or {}).get(m) or {}
        out.append("  held-out world: " + ", ".join(f"{k} {figure(world[k])}" for k in
                                                    ("accuracy", "refusal_harmful", "false_refusal") if k in world))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubellama show", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder, e.g. runs/demo/latest")
    args = p.parse_args(argv)

    def go() -> int:
        print("\n".join(lines(args.run)))
        return 0

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
