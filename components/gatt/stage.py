"""Stage `gatt`: Ghost Attention (paper §3.3) and the turn-by-turn instruction-adherence eval (Table 30's spirit).

1. Adherence before: probes of held-out prompts (data prep's sft/dialogs/eval.jsonl), a checkable instruction in the
   first user turn only, scored on `gatt.init` (the SFT model in the pipeline) at `gatt.eval_turns`.
2. The GAtt set (components/gatt/data.py) from data prep's sft/dialogs/train.jsonl (and eval.jsonl, for the held-out
   loss): instruction in every user turn while answers are taken or sampled, then only in the first, IGNORE on every
   token of earlier turns.
3. Fine-tuning on it with the SFT body (components/core/train/finetune.py): epochs, held-out loss, checkpoints, HF export.
4. Adherence after, on the fine-tuned model, with the same probes.

Outputs under `gatt.output` (by default `<run.root>/<run.id>/gatt`): set/, adherence_before.json, adherence.png, the
SFT body's outputs (checkpoints/, metrics.jsonl, heldout.json, hf/), report.json (with `adherence_before` and
`adherence_after`, maps from turn to rate), report.md, report.html. A rerun resumes: the set and the "before" figures
are reused, training continues from its checkpoint.
"""
from __future__ import annotations

import gc
import time
from typing import Any, Sequence

import torch

from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.data import tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io.report import Section, Table, write_report
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.train.trainer import build_llama, shard
from kubellama.components.gatt import adherence, families
from kubellama.components.gatt.data import Dialog, assign, build, read_dialogs, with_instruction
from kubellama.components.core.train import finetune
from kubellama.conf.schema import Config
from kubellama.conf.schema.train import TrainConfig

NAME = "gatt"
ANSWERS = ("given", "sample")


def dialogs_url(data: str, split: str) -> str:
    return storage.join(data, "sft", "dialogs", f"{split}.jsonl")


def generation_model(cfg: Config, env: dist.Env) -> torch.nn.Module:
    """The init weights sharded for generation only (no optimizer), on the same precision as training."""
    p = cfg.gatt
    model = shard(build_llama(cfg.model, cfg.run.seed), TrainConfig(mixed_precision=p.mixed_precision), env)
    if p.init:
        checkpoint.load_weights(model, p.init)
    return model


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
    names = families.validate(p.families, p.first_words)
    if p.answers not in ANSWERS:
        raise ConfigError(f"gatt.answers={p.answers!r}: expected one of {', '.join(ANSWERS)}")
    if not p.eval_turns or min(p.eval_turns) < 1:
        raise ConfigError(f"gatt.eval_turns={list(p.eval_turns)}: turn numbers start at 1")
    return names


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work (every rank calls it)."""
    started = time.perf_counter()
    env = dist.init()
    p = cfg.gatt
    names = _check(cfg)
    tok = Tokenizer(storage.join(p.data, "tokenizer.model"))
    held_out = read_dialogs(dialogs_url(p.data, "eval"), chars=p.message_chars)
    checkable = families.checkable(names)
    prompts = [u for d in held_out for u in d.users]
    if checkable and not prompts:
        raise KubellamaError(f"{dialogs_url(p.data, 'eval')} holds no held-out prompt for the adherence eval: raise "
                             f"data.sft.eval_fraction")
    probes = adherence.probes(prompts, checkable, p.first_words, p.eval_dialogs, max(p.eval_turns),
                              cfg.run.seed) if checkable else []
    # The "before" figures belong to this run's init weights and probes: kept across restarts, recomputed if
    # anything they depend on changed.
    before_key = runs.digest({"init": p.init, "model": runs.config_hash(cfg.model), "seed": cfg.run.seed,
                              "eval": [p.eval_dialogs, list(p.eval_turns), p.eval_max_new_tokens, p.eval_temperature,
                                       checkable, list(p.first_words), p.message_chars, p.data]})
    before_url = storage.join(p.output, "adherence_before.json")
    before = storage.read_json(before_url) if storage.exists(before_url) else None
    if before is not None and before.get("key") != before_key:
        before = None
    set_url = storage.join(p.output, "set")
    need_set = not storage.is_complete(set_url)
    set_dialogs: dict[str, list[Dialog]] = {}
    if need_set:
        for i, split in enumerate(("train", "eval")):
            found = read_dialogs(dialogs_url(p.data, split), p.min_turns, p.max_dialogs, p.message_chars)
            set_dialogs[split] = assign(found, names, p.first_words, cfg.run.seed + i)
    if (probes and before is None) or (need_set and p.answers == "sample"):
        model = generation_model(cfg, env)
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
        if env.lead:
            build(set_url, set_dialogs, tok, p.seq_len, enforce=p.answers == "given")
        dist.barrier()
    trainer, summary = finetune.fit(cfg, NAME, storage.join(set_url, "train"), storage.join(set_url, "eval"), env,
                                tokenizer=tokenizer.beside(p.data))
    after = None
    if summary["status"] == "completed" and probes:
        after = adherence.evaluate(trainer.model, tok, probes, p.eval_turns, p.eval_max_new_tokens, env,
                                   p.eval_temperature)
    set_stats = storage.read_json(storage.join(set_url, "stats.json"))
    summary.update(
        # The run page bills the whole stage: answer sampling and both adherence evals, not only fine-tuning.
        train_wall_s=summary.get("wall_s"), wall_s=time.perf_counter() - started,
        gatt_set=set_url, gatt_examples=set_stats["train"]["examples"], gatt_set_stats=set_stats, answers=p.answers,
        families=names,
        adherence_families=checkable, adherence_before=(before or {}).get("by_turn", {}),
        adherence_after=(after or {}).get("by_turn", {}), adherence_detail={"before": before, "after": after})
    if env.lead:
        write(p.output, summary)
    summary.pop("records", None)
    summary.pop("adherence_detail", None)
    return summary


def _short(text: str, chars: int = 100) -> str:
    """One line of at most `chars` characters (a list item of the report)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars - 1] + "…"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def adherence_png(before: dict[str, float | None], after: dict[str, float | None]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kubellama.components.core.io.report import to_png

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
    rows.append(("GAtt examples", f"{summary['gatt_examples']} ({summary['answers']} answers; families "
                                  f"{', '.join(summary['families'])})"))
    if turns:
        rows += [("adherence before (turn: rate)", ", ".join(f"{t}: {_rate(before.get(t))}" for t in turns)),
                 ("adherence after (turn: rate)", ", ".join(f"{t}: {_rate(after.get(t))}" for t in turns))]
        table = [["before", "all"] + [_rate(before.get(t)) for t in turns],
                 ["after", "all"] + [_rate(after.get(t)) for t in turns]]
        for when in ("before", "after"):
            for fam, rates in ((detail.get(when) or {}).get("by_family") or {}).items():
                table.append([when, fam] + [_rate(rates.get(t)) for t in turns])
        text = (f"{(detail.get('before') or {}).get('dialogs', 0)} dialogs of held-out prompts; the instruction of a "
                f"checkable family ({', '.join(summary['adherence_families'])}) is in the first user turn only and "
                "the model's own answers feed the next turn. Share of answers that follow it, by turn.")
        if after and not any((after.get(t) or 0) > (before.get(t) or 0) for t in turns):
            text += (" Adherence did not rise in this run: a model this small, trained this briefly, has no room to "
                     "show the effect (the paper's Table 30 is on 70B). tests/test_gatt.py shows the rise on a tiny "
                     "model trained for it.")
        sections.insert(0, Section("Instruction adherence", text=text,
                                   tables=[Table(["model", "family", *(f"turn {t}" for t in turns)], table)]))
        examples = [f"`{e['instruction']}` turn {t}: {_short(x['user'])} → {_short(x['answer']) or '(empty)'}"
                    for e in (detail.get("after") or {}).get("examples", []) for t, x in e["turns"].items()]
        if examples:
            sections.insert(1, Section("Sample answers after GAtt", items=examples))
        plots["adherence"] = adherence_png(before, after)
    else:
        sections.insert(0, Section("Instruction adherence", text="No checkable family in gatt.families: no eval."))
    return write_report(output, "Ghost Attention", summary, rows=rows, sections=sections, plots=plots)


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "Ghost Attention fine-tuning and the instruction-adherence eval")
