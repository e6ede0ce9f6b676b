"""Stage `reward`: a helpfulness or safety reward model (paper §3.2.2), one per run (`reward.kind`): the Llama of
`reward.init` with a scalar head (core/rlhf/scorer.py), trained on the ranking loss with a rating margin (loss.py) over
the paper's data mix (data.py) on the Trainer, evaluated on the held-out pairs (evaluate.py) and exported as a Hugging
Face LlamaForSequenceClassification. Outputs under `reward.output`: checkpoints/, metrics.jsonl, tb/, hf/, report.*."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from kubellama.components.core.data.pairs import read_pairs
from kubellama.components.core.data.shards import Prefetcher
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import loss_png, write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.rlhf.scorer import CLASSIFIER, Scorer, build
from kubellama.components.core.train import dist, probe
from kubellama.components.core.train.trainer import Trainer
from kubellama.components.core.world import sets
from kubellama.components.reward import data, evaluate, samples
from kubellama.components.reward.loss import pair_loss
from kubellama.conf.schema import Config
from kubellama.conf.schema.reward import KINDS, VOLATILE, RewardConfig, RewardVariantConfig, SafetyVariantConfig

NAME = "reward"
# The world samples are drawn as PPO's rollouts are (T = 1): the answers the policy gives when it explores.
SAMPLE_TEMPERATURE = 1.0


def resolve(p: RewardConfig) -> RewardConfig:
    """The section the `p.kind` RM trains with (a copy): its own settings (`reward.<kind>.*`) merged over the shared
    ones, then taken out of both per-model sections (the pipeline hands each step its section already merged so, and
    merging again changes nothing). The safety RM's auxiliary loss stays in `reward.safety`: it has no shared key."""
    if p.kind not in KINDS:
        raise ConfigError(f"reward.kind={p.kind!r}: expected one of {', '.join(KINDS)}")
    p = copy.deepcopy(p)
    shared = {f.name for f in fields(RewardConfig)}
    for kind, schema in (("helpfulness", RewardVariantConfig), ("safety", SafetyVariantConfig)):
        own = getattr(p, kind)
        for key in (f.name for f in fields(schema)):
            if key in shared and kind == p.kind and getattr(own, key) is not None:
                setattr(p, key, getattr(own, key))
            if key in shared or kind != p.kind:
                setattr(own, key, None)
    return p


def aux_weight(p: RewardConfig) -> float:
    """The weight of the safety auxiliary loss the `p.kind` RM trains with (0 for the helpfulness RM)."""
    return float(p.safety.aux_loss_weight or 0.0) if p.kind == "safety" else 0.0


def schedule(p: RewardConfig, pairs: int, world_size: int) -> RewardConfig:
    """The section the trainer runs: steps (one epoch by default), warmup (3%, at least 5) and the batch in tokens
    (pairs_per_batch rows of seq_len), worked out from the training mix."""
    per_micro = p.micro_batch * world_size
    if p.pairs_per_batch < per_micro or p.pairs_per_batch % per_micro:
        raise ConfigError(f"reward.pairs_per_batch={p.pairs_per_batch} is not a multiple of micro_batch·world_size "
                          f"= {p.micro_batch}·{world_size}")
    steps = p.max_steps or max(1, pairs // p.pairs_per_batch)
    warmup = p.warmup_steps if p.warmup_steps >= 0 else \
        min(steps, max(p.warmup_min, math.ceil(p.warmup_fraction * steps)))
    section = copy.deepcopy(p)
    section.max_steps, section.warmup_steps = steps, warmup
    section.global_batch_tokens = p.pairs_per_batch * p.seq_len
    return section


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: train on the mix, evaluate, export the classifier; rank 0 writes the report."""
    env = dist.init()
    cfg = copy.deepcopy(cfg)
    cfg.reward = p = resolve(cfg.reward)
    tok_url = storage.join(p.data, "tokenizer.model")
    if not storage.exists(tok_url):
        raise KubellamaError(f"{tok_url} does not exist: reward.data must be a data prep output")
    tok = Tokenizer(tok_url)
    pairs, digest = read_pairs(storage.join(p.data, "preference", "train.jsonl"))
    held_out, _ = read_pairs(storage.join(p.data, "preference", "eval.jsonl"))
    world_url = sets.eval_url(p.data, "pairs")
    world_pairs: list[Any] = sets.read(world_url) if world_url else []
    if p.world_samples < 0:
        raise ConfigError(f"reward.world_samples={p.world_samples}: expected a count (0: none)")
    drawn: dict[str, Any] = {"drawn": 0}
    if p.kind == "helpfulness" and p.world_samples > 0 and world_url:
        extra, drawn = samples.draw(cfg, pairs, tok, p.world_samples, SAMPLE_TEMPERATURE, env)
        pairs = [*pairs, *extra]
    mix = data.mix(pairs, p.kind, p.other_fraction, cfg.run.seed)
    section = schedule(p, len(mix.indices), env.world_size)
    source = data.PairSource([pairs[i] for i in mix.indices], tok, p.seq_len, env.rank, env.world_size,
                             p.micro_batch, cfg.run.seed)
    fp = runs.fingerprint(cfg, NAME, VOLATILE, **{"data.manifest": digest, "data.tokenizer": tok.sha256,
                                                  "init": p.init or None})
    with Prefetcher(source) as batches:
        trainer = Trainer(section, cfg.model, p.output, batches, loss_fn=pair_loss(p.margin, aux_weight(p)),
                          model=build(cfg.model, cfg.run.seed), seed=cfg.run.seed, name=NAME, env=env, init=p.init,
                          init_optional=("score.",), fingerprint=fp, run_id=cfg.run.id)
        scorer = Scorer(trainer.model, tok, p.eval_batch, p.seq_len)
        # "before" is the model as built here (the init, its head fresh), kept so a resumed run reports the same.
        before = probe.kept(p.output, "before", env, lambda: evaluate.world_scores(scorer, world_pairs, p.kind)) \
            if world_url else None
        summary = trainer.fit()
    result: dict[str, Any] = {}
    if summary["status"] == "completed":
        result = evaluate.evaluate(scorer, held_out, p)
        if world_url:
            result["world"] = evaluate.world(before, evaluate.world_scores(scorer, world_pairs, p.kind), p.kind)
        summary["hf"] = trainer.export_hf(storage.join(p.output, "hf"), tokenizer=tok_url, config=CLASSIFIER)
    mix_info = {"own": mix.own, "other": mix.other, "other_available": mix.other_available,
                "synthetic": mix.synthetic, "ratings": mix.ratings, "world_samples": drawn}
    # The fields first: KFP's Metrics panel shows the first scalars of the summary.
    summary = {"kind": p.kind, **{k: result.get(k) for k in ("accuracy", "accuracy_by_rating")},
               **({k: result.get(k) for k in ("unsafe_recall_at_0_5", "unsafe_recall_at_rule")}
                  if p.kind == "safety" else {}),
               **summary, **result, "train_pairs": len(mix.indices), "mix": mix_info,
               "pairs_per_batch": p.pairs_per_batch, "margin": p.margin, "aux_loss_weight": aux_weight(p),
               "output": p.output, "run_id": cfg.run.id,
               "lineage": trainer.lineage()}
    if env.lead:
        rows = [("status", summary["status"]), ("kind", p.kind), ("accuracy", result.get("accuracy")),
                *([("unsafe recall at σ(score) < 0.5 (Table 29)", result.get("unsafe_recall_at_0_5")),
                   (f"unsafe recall at the rule's σ(score) < {p.combined.safety_threshold}",
                    result.get("unsafe_recall_at_rule"))] if p.kind == "safety" else []),
                ("steps", summary["step"]), ("training pairs", len(mix.indices)),
                ("final loss", summary["final_loss"]), ("init", p.init or "random weights"),
                ("HF export", summary.get("hf"))]
        plots = {"loss": loss_png(summary.get("records") or [], f"{p.kind} RM: ranking loss")}
        if result.get("calibration"):
            plots["calibration"] = evaluate.calibration_png(result["calibration"], f"{p.kind} RM calibration")
        paths = write_report(p.output, f"Reward model: {p.kind}", summary, rows=rows,
                             sections=evaluate.sections(result, mix_info, p.kind) if result else [],
                             plots={k: v for k, v in plots.items() if v})
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "reward model: helpfulness or safety (reward.kind), margin ranking loss")
