"""Stage `gatt`: Ghost Attention (paper §3.3) and the turn-by-turn instruction-adherence eval (Table 30's spirit).

Adherence on the init model, the GAtt set (data.py, answers given or sampled), fine-tuning with the SFT body
(core/train/finetune.py), adherence again; report in report.py. A rerun resumes: the set and the "before" figures
are reused and training continues from its checkpoint.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import torch

from kubellama.components.core.data import tokenizer
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.train import dist, finetune
from kubellama.components.core.train.parallelize import generation_model
from kubellama.components.core.world import sets
from kubellama.components.core.world.evaluate import Probe
from kubellama.components.gatt import adherence, families, report
from kubellama.components.gatt.data import Dialog, assign, build, plain, read_dialogs, with_instruction
from kubellama.conf.schema import Config

NAME = "gatt"
ANSWERS = ("given", "sample")
TRAIN_TURNS = ("last", "all")


def dialogs_url(data: str, split: str) -> str:
    return storage.join(data, "sft", "dialogs", f"{split}.jsonl")


def sample_answers(model: torch.nn.Module, tok: Tokenizer, dialogs: list[Dialog], env: dist.Env,
                   cfg: Config) -> list[Dialog]:
    """Answers sampled with the instruction in every user turn (this rank's share, gathered on every rank); with a
    checkable instruction, dialogs with an answer that fails it are dropped."""
    p = cfg.gatt
    mine = list(range(env.rank, len(dialogs), env.world_size))
    said = adherence.converse(model, tok, [(dialogs[i].system, with_instruction(dialogs[i].users,
                                                                                dialogs[i].instruction, True))
                                           for i in mine],  # type: ignore[arg-type]
                              p.max_new_tokens, p.temperature, p.top_p, seed=cfg.run.seed + 7919 * env.rank)
    answers: list[Any] = [None] * len(dialogs)
    for i, a in zip(mine, said):
        answers[i] = a
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, answers)
        answers = [next(g[i] for g in gathered if g[i] is not None) for i in range(len(dialogs))]
    kept = []
    for d, a in zip(dialogs, answers):
        check = d.instruction.check  # type: ignore[union-attr]
        if check is None or all(check(x) for x in a):
            kept.append(Dialog(d.system, d.users, a, d.instruction, {"answers": "sampled"}))
    return kept


def _check(cfg: Config) -> list[str]:
    p = cfg.gatt
    names = families.validate_config(p)
    if p.answers not in ANSWERS:
        raise ConfigError(f"gatt.answers={p.answers!r}: expected one of {', '.join(ANSWERS)}")
    if p.train_turns not in TRAIN_TURNS:
        raise ConfigError(f"gatt.train_turns={p.train_turns!r}: expected one of {', '.join(TRAIN_TURNS)}")
    if not 0.0 <= p.plain_share < 1.0:
        raise ConfigError(f"gatt.plain_share={p.plain_share}: expected a share in [0, 1)")
    if not p.eval_turns or min(p.eval_turns) < 1:
        raise ConfigError(f"gatt.eval_turns={list(p.eval_turns)}: turn numbers start at 1")
    return names


def eval_probes(cfg: Config, checkable: list[str], world_dialogs: str | None) -> list[adherence.Probe]:
    """The adherence eval's dialogs, their instructions from the held-out values (never trained): the world's
    held-out dialogs when data prep built the world, else held-out SFT prompts."""
    p = cfg.gatt
    heldout = families.values(p, heldout=True)
    turns = max(p.eval_turns)
    if world_dialogs:
        return adherence.world_probes(sets.read(world_dialogs), checkable, heldout, p.eval_dialogs, turns,
                                      cfg.run.seed)
    held_out = read_dialogs(dialogs_url(p.data, "eval"), chars=p.message_chars)
    prompts = [u for d in held_out for u in d.users]
    if not prompts:
        raise KubellamaError(f"{dialogs_url(p.data, 'eval')} holds no held-out prompt for the adherence eval: raise "
                             f"data.sft.eval_fraction")
    return adherence.probes(prompts, checkable, heldout, p.eval_dialogs, turns, cfg.run.seed)


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work (every rank calls it)."""
    started = time.perf_counter()
    env = dist.init()
    p = cfg.gatt
    names = _check(cfg)
    tok = Tokenizer(storage.join(p.data, "tokenizer.model"))
    checkable = families.checkable(names)
    world_dialogs = sets.eval_url(p.data, "dialogs")
    probes = eval_probes(cfg, checkable, world_dialogs) if checkable else []
    # The "before" figures belong to this run's init weights and probes (the world's dialogs or the SFT prompts,
    # their held-out instructions) and to the eval's arms: kept across restarts, recomputed if any of it changed.
    before_key = runs.digest({"init": p.init, "model": runs.config_hash(cfg.model), "seed": cfg.run.seed,
                              "eval": [p.eval_dialogs, list(p.eval_turns), p.eval_max_new_tokens, p.eval_temperature,
                                       checkable, p.message_chars, p.data],
                              "arms": ["adherence", "control"], "world": world_dialogs,
                              "probes": [[x.instruction.text, x.users] for x in probes]})
    before_url = storage.join(p.output, "adherence_before.json")
    before = storage.read_json(before_url) if storage.exists(before_url) else None
    if before is not None and before.get("key") != before_key:
        before = None
    set_url = storage.join(p.output, "set")
    need_set = not storage.is_complete(set_url)
    set_dialogs: dict[str, list[Dialog]] = {}
    every: dict[str, list[Dialog]] = {}
    if need_set:
        for i, split in enumerate(("train", "eval")):
            # Read once: the instructed dialogs (long enough, at most max_dialogs) and the plain ones' pool.
            every[split] = read_dialogs(dialogs_url(p.data, split), 1, 0, p.message_chars)
            found = [d for d in every[split] if len(d.answers) >= p.min_turns][:p.max_dialogs or None]
            set_dialogs[split] = assign([Dialog(d.system, d.users, d.answers) for d in found], names,
                                        families.values(p), cfg.run.seed + i)
    if (probes and before is None) or (need_set and p.answers == "sample"):
        model = generation_model(cfg.model, p.init, p.mixed_precision, cfg.run.seed, env)
        if probes and before is None:
            before = {"key": before_key, **adherence.evaluate(model, tok, probes, p.eval_turns,
                                                             p.eval_max_new_tokens, env, p.eval_temperature)}
            if env.lead:
                storage.write_json(before_url, before)
        if need_set and p.answers == "sample":
            set_dialogs = {s: sample_answers(model, tok, d, env, cfg) for s, d in set_dialogs.items()}
        del model
        gc.collect()
    if need_set:
        # Plain dialogs keep their given answers (after any sampling): what SFT taught, without an instruction.
        for i, split in enumerate(("train", "eval")):
            if p.plain_share > 0:
                set_dialogs[split] += plain(every[split], len(set_dialogs[split]), p.plain_share,
                                             cfg.run.seed + 100 + i, p.min_turns)
        if env.lead:
            build(set_url, set_dialogs, tok, p.seq_len, enforce=p.answers == "given",
                  last_only=p.train_turns == "last")
        dist.barrier()
    trainer, summary = finetune.fit(cfg, NAME, storage.join(set_url, "train"), storage.join(set_url, "eval"), env,
                                tokenizer=tokenizer.beside(p.data), world=Probe.of(p.data))
    after = None
    if summary["status"] == "completed" and probes:
        after = adherence.evaluate(trainer.model, tok, probes, p.eval_turns, p.eval_max_new_tokens, env,
                                   p.eval_temperature)
    set_stats = storage.read_json(storage.join(set_url, "stats.json"))
    if before is not None and after is not None:
        figures = adherence.figures(before, after, p.eval_turns)
        summary["adherence"] = figures
        if world_dialogs:
            # Merged with finetune.fit's single-turn world figures.
            summary["world"] = {**summary.get("world", {}), **figures}
    summary.update(
        # The run page bills the whole stage: answer sampling and both adherence evals, not only fine-tuning.
        train_wall_s=summary.get("wall_s"), wall_s=time.perf_counter() - started,
        gatt_set=set_url, gatt_examples=set_stats["train"]["examples"], gatt_set_stats=set_stats, answers=p.answers,
        families=names,
        adherence_families=checkable, adherence_before=(before or {}).get("by_turn", {}),
        adherence_after=(after or {}).get("by_turn", {}), control_before=(before or {}).get("control_by_turn", {}),
        control_after=(after or {}).get("control_by_turn", {}), adherence_source="world dialogs" if world_dialogs
        else "SFT prompts", adherence_detail={"before": before, "after": after})
    if env.lead:
        report.write(p.output, summary)
    summary.pop("records", None)
    summary.pop("adherence_detail", None)
    summary.pop("adherence", None)
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "Ghost Attention fine-tuning and the instruction-adherence eval")
