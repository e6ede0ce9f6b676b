"""The init model's own answers to the world's task prompts, judged by the rule (issue 21): the helpfulness RM's
training pairs otherwise pit a gold answer against a hand-made corruption, while rejection sampling and PPO need it
to see the errors the policy actually makes. Each wrong sample is paired under a right answer (one of the model's,
else the gold one), "significantly better", kind "correctness" as the world's own pairs. Collective: every rank
draws the same samples (seeded) so the training mix is the same everywhere."""
from __future__ import annotations

import gc
import random
from collections.abc import Sequence
from typing import Any

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.model.generate import generate
from kubellama.components.core.train import dist
from kubellama.components.core.train.parallelize import generation_model
from kubellama.components.core.world import rules
from kubellama.conf.schema import Config
from kubellama.conf.schema.data import RATINGS

# World answers are a few tokens; a sample that has not ended by then is cut, never judged.
MAX_NEW_TOKENS = 16
BATCH = 64
# The rule-rated kinds whose chosen answer is the gold one.
GOLD_KINDS = ("correctness", "format", "negligible")
SOURCE = "world samples"


def gold_prompts(pairs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Single-turn world task prompts of the training pairs and their gold answers, in file order."""
    out: dict[str, str] = {}
    for p in pairs:
        if p.get("kind") in GOLD_KINDS and len(p["messages"]) == 1 and not p["safety"]:
            out.setdefault(p["messages"][0]["content"], p["chosen"])
    return out


def label(prompt: str, gold: str, answers: Sequence[str]) -> list[dict[str, Any]]:
    """Pairs of one prompt's samples: every distinct wrong one under a right one (the first right sample, else
    the gold answer)."""
    right = next((a for a in answers if rules.correct(gold, a)), gold)
    wrong = list(dict.fromkeys(a for a in answers if a and not rules.correct(gold, a)))
    return [{"messages": [{"role": "user", "content": prompt}], "chosen": right, "rejected": w,
             "rating": RATINGS[0], "chosen_safe": True, "rejected_safe": True, "safety": False,
             "kind": "correctness", "source": SOURCE, "synthetic": False} for w in wrong]


def draw(cfg: Config, pairs: Sequence[dict[str, Any]], tok: Tokenizer, count: int, temperature: float,
         env: dist.Env) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Collective: `count` answers from `reward.init` (one per world prompt of `pairs`, prompts in a seeded order,
    again from the start when there are fewer), their pairs and what was drawn."""
    p = cfg.reward
    gold = gold_prompts(pairs)
    if not count or not gold or not p.init:
        return [], {"drawn": 0}
    prompts = sorted(gold)
    random.Random(cfg.run.seed).shuffle(prompts)
    picked = [prompts[i % len(prompts)] for i in range(count)]
    model = generation_model(cfg.model, p.init, p.mixed_precision, cfg.run.seed, env)
    model.eval()
    answers: dict[str, list[str]] = {}
    ended = 0
    for i in range(0, len(picked), BATCH):
        chunk = picked[i:i + BATCH]
        ids = [tok.encode_dialog_prompt([{"role": "user", "content": q}]) for q in chunk]
        outs = generate(model, ids, MAX_NEW_TOKENS, temperature=temperature, eos_id=tok.eos_id,
                        seeds=[cfg.run.seed * 1_000_003 + i + j for j in range(len(chunk))])
        for q, out in zip(chunk, outs):
            if out and out[-1] == tok.eos_id:
                ended += 1
                answers.setdefault(q, []).append(tok.decode([t for t in out[:-1] if t < tok.vocab_size]).strip())
    del model
    gc.collect()
    made = [x for q, a in answers.items() for x in label(q, gold[q], a)]
    right = sum(rules.correct(gold[q], x) for q, a in answers.items() for x in a)
    return made, {"drawn": len(picked), "ended": ended, "right": right, "pairs": len(made),
                  "temperature": temperature}
