"""The world's record sets, a function of (config, seed) alone: pretraining text, SFT dialogs, preference pairs with
the paper's four ratings decided by the rule, prompts for rejection sampling and PPO, and held-out sets. Every
prompt falls in one bucket by a stable hash of its text, so the RMs' prompts, the RS/PPO prompts, PPO's calibration
prompts and the held-out prompts never meet."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.world import rules, safety
from kubellama.conf.schema.data import RATINGS, WorldConfig

# Shares of each family's distinct prompts: the training buckets first, then the held-out ones.
BUCKETS = {"pretrain": 0.14, "sft": 0.26, "rm": 0.2, "rm_eval": 0.06, "rs": 0.08, "ppo": 0.08, "calib": 0.08,
           "eval": 0.1}
# Safety prompts are few (forms × requests): more of them are held out, so refusal rates rest on enough prompts.
SAFETY_BUCKETS = {"sft": 0.4, "rm": 0.2, "rm_eval": 0.08, "rs": 0.04, "ppo": 0.04, "eval": 0.24}
# Candidate draws per family: enough distinct prompts for every bucket of the larger families.
DRAWS = 6000


def unit(key: str, seed: int) -> float:
    h = hashlib.blake2b(f"world:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def bucket(key: str, seed: int, shares: dict[str, float]) -> str:
    u, acc = unit(key, seed), 0.0
    for name, share in shares.items():
        acc += share
        if u < acc:
            return name
    return name


def _pools(families: Sequence[str], seed: int) -> dict[str, dict[str, list[rules.Task]]]:
    """family -> bucket -> distinct tasks, in draw order."""
    out: dict[str, dict[str, list[rules.Task]]] = {}
    for fam in families:
        rng, seen = random.Random(f"{seed}:{fam}"), set()
        by: dict[str, list[rules.Task]] = {b: [] for b in BUCKETS}
        for _ in range(DRAWS):
            t = rules.task(fam, rng)
            if t.prompt not in seen:
                seen.add(t.prompt)
                by[bucket(t.prompt, seed, BUCKETS)].append(t)
        out[fam] = by
    return out


def _draw(rng: random.Random, pool: list, n: int, distinct: bool) -> list:
    """n items of a bucket: distinct ones (held-out sets; fewer when the bucket is small) or with repeats."""
    if not pool:
        return []
    return pool[:n] if distinct else [rng.choice(pool) for _ in range(n)]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _pair(prompt: str, chosen: str, rejected: str, rating: str, *, safety_tag: bool = False,
          chosen_safe: bool = True, rejected_safe: bool = True, kind: str = "") -> dict[str, Any]:
    return {"messages": _user(prompt), "chosen": chosen, "rejected": rejected, "rating": rating,
            "chosen_safe": chosen_safe, "rejected_safe": rejected_safe, "safety": safety_tag, "kind": kind}


def task_pair(t: rules.Task, rng: random.Random) -> dict[str, Any]:
    """A rule-rated pair: right vs wrong is significantly better (or better, for a near miss in a long list); a
    right bare value vs the same value out of format is slightly better; a final period is negligible."""
    r = rng.random()
    if r < 0.7:
        bad = rules.wrong(t, rng)
        near = t.family in ("copy", "reverse", "sort") and len(t.answer.split()) > 3
        return _pair(t.prompt, t.answer, bad, RATINGS[1] if near else RATINGS[0], kind="correctness")
    if r < 0.9:
        return _pair(t.prompt, t.answer, rules.decorated(t.answer), RATINGS[2], kind="format")
    return _pair(t.prompt, t.answer, t.answer + ".", RATINGS[3], kind="negligible")


def safety_pair(p: safety.SafetyPrompt) -> dict[str, Any]:
    """Harmful: a refusal over compliance (significantly better; the rejected answer unsafe). Benign look-alike:
    the helpful answer over a refusal (better; both safe), so refusing is not what the safety RM rewards."""
    if p.harmful:
        return _pair(p.prompt, safety.REFUSAL, safety.COMPLY, RATINGS[0], safety_tag=True, rejected_safe=False,
                     kind="harmful")
    return _pair(p.prompt, p.answer, safety.REFUSAL, RATINGS[1], safety_tag=True, kind="borderline")


def _safety_pools(seed: int) -> dict[str, list[safety.SafetyPrompt]]:
    by: dict[str, list[safety.SafetyPrompt]] = {b: [] for b in SAFETY_BUCKETS}
    for p in safety.every_prompt():
        by[bucket(p.prompt, seed, SAFETY_BUCKETS)].append(p)
    return by


def check(cfg: WorldConfig) -> None:
    unknown = [f for f in cfg.families if f not in rules.FAMILIES]
    if unknown:
        raise ConfigError(f"data.world.families: unknown family '{unknown[0]}'; families: "
                          f"{', '.join(rules.FAMILIES)}")
    if not 0.0 <= cfg.dialog_safety <= 1.0:
        raise ConfigError(f"data.world.dialog_safety={cfg.dialog_safety}: expected a share in [0, 1]")
    if cfg.max_turns < 2:
        raise ConfigError(f"data.world.max_turns={cfg.max_turns}: a multi-turn dialog needs at least 2 turns")


def build(cfg: WorldConfig, seed: int) -> dict[str, list[Any]]:
    """Every record set of the world. Keys: pretrain (text lines), sft (dialogs as messages), pairs (preference
    pairs), rs and ppo (prompts), and the held-out eval_tasks, eval_calib, eval_safety, eval_dialogs, eval_pairs."""
    check(cfg)
    rng = random.Random(f"world:{seed}")
    pools, spools = _pools(cfg.families, seed), _safety_pools(seed)
    out: dict[str, list[Any]] = {k: [] for k in ("pretrain", "sft", "pairs", "rs", "ppo", "eval_tasks",
                                                  "eval_calib", "eval_safety", "eval_dialogs", "eval_pairs")}
    for fam in cfg.families:
        by = pools[fam]
        out["pretrain"] += [f"Question: {t.prompt} Answer: {t.answer}"
                            for t in _draw(rng, by["pretrain"], cfg.pretrain, False)]
        out["sft"] += [{"messages": _user(t.prompt) + [{"role": "assistant", "content": t.answer}]}
                       for t in _draw(rng, by["sft"], cfg.sft, False)]
        out["pairs"] += [task_pair(t, rng) for t in _draw(rng, by["rm"], cfg.pairs, False)]
        for name in ("rs", "ppo"):
            out[name] += [{**t.record(), "safety": False} for t in _draw(rng, by[name], getattr(cfg, name), True)]
        out["eval_calib"] += [t.record() for t in _draw(rng, by["calib"], cfg.calib, True)]
        out["eval_tasks"] += [t.record() for t in _draw(rng, by["eval"], cfg.eval, True)]
        out["eval_pairs"] += [task_pair(t, rng) for t in _draw(rng, by["rm_eval"], cfg.eval, True)]
    out["pretrain"] += rules.fact_lines() * cfg.fact_repeats
    wordy = [f for f in cfg.families if f in rules.WORDY]
    if wordy:
        for _ in range(cfg.dialogs):
            msgs: list[dict[str, str]] = []
            for _ in range(rng.randint(2, cfg.max_turns)):
                if cfg.dialog_safety > 0 and spools["sft"] and rng.random() < cfg.dialog_safety:
                    s = rng.choice(spools["sft"])
                    prompt, answer = s.prompt, s.answer
                else:
                    t = rng.choice(pools[rng.choice(wordy)]["sft"])
                    prompt, answer = t.prompt, t.answer
                msgs += _user(prompt) + [{"role": "assistant", "content": answer}]
            out["sft"].append({"messages": msgs})
        out["eval_dialogs"] = [[rng.choice(pools[rng.choice(wordy)]["eval"]).record() for _ in range(cfg.max_turns)]
                               for _ in range(cfg.eval_dialogs)]
    out["sft"] += [{"messages": _user(p.prompt) + [{"role": "assistant", "content": p.answer}]}
                   for p in _draw(rng, spools["sft"], cfg.safety_sft, False)]
    out["pairs"] += [safety_pair(p) for p in _draw(rng, spools["rm"], cfg.safety_pairs, False)]
    for name in ("rs", "ppo"):
        out[name] += [{**p.record(), "safety": True} for p in spools[name]]
    out["eval_safety"] = [p.record() for p in spools["eval"]]
    out["eval_pairs"] += [safety_pair(p) for p in spools["rm_eval"]]
    rng.shuffle(out["sft"])
    rng.shuffle(out["pairs"])
    rng.shuffle(out["pretrain"])
    return out
