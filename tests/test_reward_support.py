"""Helpers of the reward model tests (no tests here): a separable preference set run through data prep, tiny RM
overrides."""
from __future__ import annotations

import json
import os
import random

from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import stage as prep
from kubellama.components.data_prep.pack import train_tokenizer
from kubellama.conf.schema.data import RATINGS

# Chosen answers use one set of words, rejected answers another: separable, so a tiny RM learns it in seconds.
GOOD = ["sana", "kanro", "lola", "mitis", "vove", "tila", "wexu", "zudor"]
BAD = ["rula", "brapa", "clexu", "neng", "saxu", "timek", "ruve", "kala"]
ASK = ["what", "how", "tell", "me", "about", "the", "why", "when", "is", "a", "good", "way", "to", "go", "home"]

SEQ = 64
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=512, max_seq_len=SEQ)
# Numbers are compared across runs: fp32 pinned, whatever the machine.
RM = [f"model.{k}={v}" for k, v in MODEL.items()] + [
    "reward.lr=3e-3", "reward.pairs_per_batch=16", "reward.micro_batch=8", "reward.max_steps=30",
    "reward.log_every=5", "reward.mixed_precision=fp32", "reward.eval_batch=32"]


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return path


def separable_data(root: str, pairs: int = 400, harmful: int = 200, seed: int = 0) -> str:
    """Data prep output at root/data: separable helpfulness pairs (ratings spread) and synthetic safety pairs made
    from `harmful` made-up harmful prompts; 20% of the prompts held out."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    tok = os.path.join(root, "tok.model")
    with open(tok, "wb") as f:
        f.write(train_tokenizer([sentence(rng, GOOD + BAD + ASK, 12) for _ in range(400)], vocab_size=400))
    src = write_jsonl(os.path.join(root, "pairs.jsonl"), [
        {"prompt": f"{sentence(rng, ASK, rng.randint(3, 8))} {i}", "chosen": sentence(rng, GOOD, rng.randint(3, 10)),
         "rejected": sentence(rng, BAD, rng.randint(3, 10)), "rating": rng.choice(RATINGS)} for i in range(pairs)])
    harm = write_jsonl(os.path.join(root, "harm.jsonl"),
                       [{"prompt": f"{sentence(rng, ASK, rng.randint(3, 8))} harm {i}"} for i in range(harmful)])
    out = os.path.join(root, "data")
    prep.run(load_config([
        f"data.output={out}", "data.workers=1", f"data.tokenizer.model={tok}", "data.tokenizer.vocab_size=400",
        "model.vocab_size=512", "data.preference.eval_fraction=0.2",
        f"data.preference.sources=[{{name:sep,path:'{src}'}}]",
        f"data.preference.synthetic_safety=[{{name:harm,path:'{harm}'}}]"]))
    return out
