"""Stage `safety_eval`: the safety benchmarks on the run's models side by side, the promotion gate, the run's page.

Models: `safety_eval.init` (the model to gate: in the pipeline the newest model stage's output), the run's other
model checkpoints (`compare_run`), `safety_eval.models` and the baseline (`safety_eval.baseline`, else the run's
pretrained model). Benchmarks (components/safety_eval/benchmarks.py): TruthfulQA MC1/MC2 by likelihood (plus % true
and informative with judge checkpoints), % toxic generations (classifier, detoxify or the labelled lexicon
fallback), BOLD sentiment per group (VADER) and refusal / false-refusal rates. A benchmark without data is reported
as not evaluated. Decoding: temperature 0.1, top-p 0.9, seeded (paper §4.1).

Outputs under `safety_eval.output` (by default `<run.root>/<run.id>/safety_eval`):
generations/<model>/<benchmark>.jsonl, report.json (`models`: name -> checkpoint URL, `scores`: benchmark metric ->
model -> value, `gate`, per-group tables), report.md, report.html with one chart per benchmark; and the run's page
`<run.root>/<run.id>/report.html`.

The gate (components/safety_eval/gate.py) fails the stage in `enforce` mode: the report is still written (status
`failed`, with the error naming every failed line), then the launcher raises, so the CLI exits 2 and the pipeline
step fails with that line.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from typing import Any, Sequence

from kubellama.components.core.train import dist
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import to_dict
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.safety_eval import gate as gating, reporting
from kubellama.components.safety_eval.benchmarks import Context, Items, Result, selected
from kubellama.components.safety_eval.runner import Runner, source

NAME = "safety_eval"
# The model stages of a run, oldest first: the side-by-side report's columns.
MODEL_STAGES = ("pretrain", "sft", "gatt", "rejection_sampling", "ppo")
_STEP = re.compile(r"^step_\d+$")


def name_of(url: str) -> str:
    """A model's name from its URL: the stage folder it belongs to (…/ppo/hf -> ppo), else the last part."""
    parts = [p for p in url.rstrip("/").split("/") if p]
    while len(parts) > 1 and (parts[-1] in ("hf", "checkpoints") or _STEP.match(parts[-1])):
        parts.pop()
    return parts[-1] if parts else url


def model_set(cfg: Any) -> tuple[dict[str, str], str, str | None]:
    """({name: URL} in report order, the gated model's name, the baseline's name or None)."""
    s = cfg[NAME]
    if not s.init:
        raise ConfigError("safety_eval.init is empty: give the model to evaluate (an HF Llama directory, a kubellama "
                          "checkpoint or a model stage's output folder)")
    models: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}

    def add(name: str, url: str, required: bool) -> str | None:
        try:
            key = source(url)
        except KubellamaError:
            if required:
                raise
            return None  # a stage of this run that left no model (yet)
        if key in seen:
            return seen[key]
        while name in models:
            name += "'"
        models[name] = url
        seen[key] = name
        return name

    if s.compare_run and cfg.run.id:
        for stage in MODEL_STAGES:
            url = storage.join(cfg.run.root, cfg.run.id, stage)
            if storage.isdir(url):
                add(stage, url, required=False)
    for name, url in s.models.items():
        add(name, url, required=True)
    gated = add(s.name or name_of(s.init), s.init, required=True)
    baseline = add(name_of(s.baseline), s.baseline, required=True) if s.baseline else \
        ("pretrain" if "pretrain" in models else None)
    assert gated is not None
    return models, gated, baseline


def _write_generations(output: str, results: dict[str, dict[str, Result]]) -> None:
    for model, per_bench in results.items():
        for bench, res in per_bench.items():
            text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in res.records)
            storage.write_text(storage.join(output, "generations", model, f"{bench}.jsonl"), text)


def _log(env: dist.Env, message: str) -> None:
    if env.lead:
        print(f"safety eval: {message}", flush=True)


def train(cfg: Any) -> dict[str, Any]:
    """Every rank: evaluate each model on each benchmark (work spread over the ranks); rank 0 writes the reports."""
    env = dist.init()
    s = cfg[NAME]
    started = time.time()
    benches = selected(s)
    gating.validate(s.gate)
    models, gated, baseline = model_set(cfg)
    loaded: dict[str, Items | None] = {b.name: b.load(s, s.data) for b in benches}
    ctx = Context(s, device=str(env.device))
    results: dict[str, dict[str, Result]] = {}
    if any(loaded.values()):
        for name, url in models.items():
            t0 = time.time()
            runner = Runner(name, url, cfg.model, s.data, s.mixed_precision, s.decoding, name in s.chat_models, env)
            results[name] = {}
            for bench in benches:
                items = loaded[bench.name]
                if items is not None:
                    results[name][bench.name] = bench.run(runner, items, ctx)
            runner.close()
            _log(env, f"{name} ({runner.kind} {runner.src}) evaluated in {time.time() - t0:.0f} s")
    scores: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for model, per_bench in results.items():
        for bench, res in per_bench.items():
            for metric, value in res.scores.items():
                scores.setdefault(f"{bench}.{metric}", {})[model] = value
            if res.groups:
                groups.setdefault(bench, {})[model] = res.groups
    evaluated = {b for b, items in loaded.items() if items is not None}
    lines = gating.check(s.gate, scores, gated, baseline, models, evaluated)
    error = gating.verdict(lines, s.gate.mode, gated)
    run_dir = storage.join(cfg.run.root, cfg.run.id)
    toxicity = ctx.toxicity().label if "toxicity" in evaluated else "not evaluated"
    d = s.decoding
    summary: dict[str, Any] = {
        "status": "failed" if error else "completed",
        **({"error": error} if error else {}),
        "scores": scores,
        "model": gated, "baseline": baseline, "models": models,
        "gate": {"mode": s.gate.mode, "passed": not any(ln.status == "fail" for ln in lines),
                 "lines": [asdict(ln) for ln in lines]},
        "benchmarks": {b: {"sources": items.sources if items else None} for b, items in loaded.items()},
        # Lists, not maps: KFP Metrics take the scores, these stay in the report.
        "groups": {b: [{"group": g, **{m: per[m].get(g) for m in per}} for g in sorted({g for v in per.values()
                                                                                         for g in v})]
                   for b, per in groups.items()},
        "toxicity_scorer": toxicity,
        "decoding": f"temperature {d.temperature}, top-p {d.top_p}, max {d.max_new_tokens} new tokens, seed {d.seed}",
        "generations": storage.join(s.output, "generations"),
        "output": s.output, "run_id": cfg.run.id,
        "run_page": storage.join(run_dir, "report.html") if s.run_page else None,
        "world_size": env.world_size, "wall_s": round(time.time() - started, 2), "ended": time.time(),
        "lineage": {"config_hash": runs.digest(to_dict(s)),
                    "data_hash": runs.digest({b: i.sources for b, i in loaded.items() if i}) if evaluated else None,
                    "parent": s.init},
    }
    if env.lead:
        _write_generations(s.output, results)
        paths = reporting.write(s.output, summary, groups)
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
        if s.run_page:
            from kubellama.components.safety_eval import runpage

            runpage.write(cfg, run_dir)
        verdict = "passed" if summary["gate"]["passed"] else ("FAILED" if error else "failed (report mode)")
        _log(env, f"gate {verdict} for {gated}; report {paths['html']}")
    dist.barrier()
    return summary


def run(cfg: Any) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind). Raises
    launch.StageFailed (carrying the report) when the gate fails."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "Safety benchmarks side by side, promotion gate and the run's page")

