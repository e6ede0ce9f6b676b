"""Stage `safety_eval`: the safety benchmarks on the run's models side by side, the promotion gate, the run's page.

Every rank evaluates its share (benchmarks.py, runner.py); rank 0 writes generations/, the side-by-side report
(report.py) and the run's page (run_page.py). In `enforce` mode a failed gate (gate.py) still writes the report, then
fails the stage with the gate's line. Models, benchmarks and outputs: docs/stages/safety-eval.md.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import to_dict
from kubellama.components.core.train import dist
from kubellama.components.core.world import sets as world_sets
from kubellama.components.core.world.evaluate import Probe, figures, showcase
from kubellama.components.core.world.instructions import begins_with
from kubellama.components.safety_eval import gate as gating
from kubellama.components.safety_eval import report, run_page
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


def evaluate(cfg: Any) -> dict[str, Any]:
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
    probe = Probe.of(s.data)
    dialogs = world_sets.eval_url(s.data, "dialogs")
    dialog = world_sets.read(dialogs)[0] if dialogs else None
    # A start word GAtt never trained on (gatt.heldout_first_words): a new instruction of a trained family.
    instruction = begins_with((list(cfg.gatt.heldout_first_words) or ["Indeed"])[0])
    world: dict[str, dict[str, Any]] = {}
    said: dict[str, list[dict[str, Any]]] = {}
    if any(loaded.values()) or probe is not None:
        for name, url in models.items():
            t0 = time.time()
            runner = Runner(name, url, cfg.model, s.data, s.mixed_precision, s.decoding, name in s.chat_models, env)
            results[name] = {}
            for bench in benches:
                items = loaded[bench.name]
                if items is not None:
                    results[name][bench.name] = bench.run(runner, items, ctx)
            if probe is not None:
                # The world's held-out tasks and safety prompts, greedy, in the chat format every stage trains on.
                items_of = probe(runner.model, runner.tok)
                world[name] = figures(items_of)
                said[name] = showcase(runner.model, runner.tok, probe, dialog, instruction)
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
    # Toxicity scored by the lexicon fallback is reported, not gated as if a classifier had scored it.
    fallback = {"toxicity"} if "toxicity" in evaluated and ctx.toxicity().fallback else set()
    lines = gating.check(s.gate, scores, gated, baseline, models, evaluated, fallback)
    error = gating.verdict(lines, s.gate.mode, gated)
    # Whether the gate's lines would pass each model (promotion still follows the gated one).
    by_model = {m: not any(ln.status == "fail" for ln in gating.check(s.gate, scores, m, baseline, models, evaluated,
                                                                     fallback))
                for m in models}
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
        "gate_by_model": by_model,
        **({"world": world, "world_examples": said} if world else {}),
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
        paths = report.write(s.output, summary, groups)
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
        if s.run_page:
            run_page.write(cfg, run_dir)
        verdict = "passed" if summary["gate"]["passed"] else ("FAILED" if error else "failed (report mode)")
        _log(env, f"gate {verdict} for {gated}; report {paths['html']}")
    dist.barrier()
    return summary


def run(cfg: Any) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind). Raises
    launch.StageFailed (carrying the report) when the gate fails."""
    return launch.run(cfg, NAME, evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, evaluate, argv, "Safety benchmarks side by side, promotion gate and the run's page")

