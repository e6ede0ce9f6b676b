"""Helpers shared by the SFT and GAtt tests (no tests here): synthetic dialogs, a data prep output made from them by
the real stage, and the tiny model's overrides."""
from __future__ import annotations

import json
import os
import random

from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import stage as data_prep

SEQ = 128
VOCAB = 640
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=VOCAB, max_seq_len=SEQ)
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo") for b in ("n", "ro", "tis", "la", "dor")]


def dialog(rng: random.Random, turns: int = 1) -> dict:
    """A chat record whose answers follow from the question (the last word, then the first, repeated), so a model
    can learn them."""
    msgs = []
    for _ in range(turns):
        q = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        msgs += [{"role": "user", "content": " ".join(q).capitalize() + "?"},
                 {"role": "assistant", "content": f"{q[-1].capitalize()} {q[0]} {q[0]}."}]
    return {"messages": msgs}


def write_dialogs(path: str, n: int, seed: int = 0, turns: int = 1) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.writelines(json.dumps(dialog(rng, turns)) + "\n" for _ in range(n))
    return path


def write_text(path: str, lines: int = 300, seed: int = 1) -> str:
    """Pretraining text in which the GAtt instructions occur, so the tokenizer has pieces for their words."""
    from kubellama.conf.schema.gatt import GattConfig

    rng = random.Random(seed)
    phrases = [f"Begin every answer with the word {w}." for w in GattConfig().first_words] + \
        ["Answer only in capital letters.", "Always answer in French.", "You enjoy tennis.", "Act as Napoleon."]
    with open(path, "w") as f:
        for _ in range(lines):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
            f.write(json.dumps({"text": f"{rng.choice(phrases)} {words.capitalize()}. {rng.choice(phrases)}"}) + "\n")
    return path


def model_overrides() -> list[str]:
    return [f"model.{k}={v}" for k, v in MODEL.items()]


def make_data(folder: str, dialogs: int = 240, turns: int = 1, **more: object) -> str:
    """Data prep's output (tokenizer, sft/{train,eval} shards, dialogs) for synthetic dialogs; returns its URL."""
    src = write_dialogs(os.path.join(folder, "dialogs.jsonl"), dialogs, turns=turns)
    text = write_text(os.path.join(folder, "text.jsonl"))
    out = os.path.join(folder, "data")
    keys = {"data.output": out, "data.workers": 1, "data.tokenizer.vocab_size": VOCAB, "data.max_error_rate": 0.0,
            "data.sft.eval_fraction": 0.1, **more}
    data_prep.run(load_config([*model_overrides(), *(f"{k}={v}" for k, v in keys.items()),
                               f"data.sft.sources=[{{name:chat,path:'{src}'}}]",
                               f"data.sources=[{{name:text,path:'{text}'}}]"]))
    return out


def sft_overrides(section: str = "sft", **more: object) -> list[str]:
    """The SFT body on the tiny model: fp32 so runs compare exactly, 4 rows of SEQ tokens per step."""
    keys = {"lr": 3e-3, "warmup_steps": 0, "global_batch_tokens": 4 * SEQ, "micro_batch": 2, "log_every": 1,
            "mixed_precision": "fp32", **more}
    return [*model_overrides(), *(f"{section}.{k}={v}" for k, v in keys.items())]
