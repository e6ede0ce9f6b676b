"""The rule-checked world (core/world) as a data source: its record sets written under `<output>/world/`, each file
atomically and the folder marked complete last, then added to the config as ordinary sources (pretraining text,
SFT dialogs, preference pairs, RS and PPO prompts). The held-out sets go to `world/eval/` and into no dataset.

Both the plan step and the merge step call `mixed` (a function of the config alone): the plan sees the world's text
as a pretraining source (so the workers, packers and tokenizer sample do), the merge its dialogs, pairs and prompts.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import from_dict, to_dict
from kubellama.components.core.world import build, sets
from kubellama.conf.schema import Config

NAME = "world"  # the pretraining, SFT and pair sources; the prompt sets are world_rs and world_ppo (their ids differ)
# Pretraining text: this many question/answer or fact lines per document, so the corpus filters (min_chars) and
# exact dedup see documents, not the short lines, and the facts' deliberate repeats survive dedup.
DOC_LINES = 8
# Training files in world/, by record set.
TRAIN = {"pretrain": "pretrain.jsonl", "sft": "sft.jsonl", "pairs": "pairs.jsonl", "rs": "rs.jsonl",
         "ppo": "ppo.jsonl"}


def _key(cfg: Config) -> str:
    """What the world's files are a function of: data.world and data.seed."""
    return runs.digest({"world": to_dict(cfg.data.world), "seed": int(cfg.data.seed)}, 16)


def _jsonl(url: str, records: Iterable[Any]) -> int:
    n = 0
    with storage.atomic_write(url) as f:
        for rec in records:
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
            n += 1
    return n


def is_world(name: str) -> bool:
    """Is source `name` one the world added? Its records are synthetic and clean by construction, and repeat on
    purpose (a small family's few prompts are drawn again), so record cleaning (exact dedup) leaves them alone."""
    return name in (NAME, f"{NAME}_rs", f"{NAME}_ppo")


def documents(lines: list[str]) -> list[dict[str, str]]:
    return [{"text": "\n".join(lines[i:i + DOC_LINES])} for i in range(0, len(lines), DOC_LINES)]


def materialise(cfg: Config) -> dict[str, Any] | None:
    """Write the world's files for this config (kept when its marker names the same world and seed); what the
    report says: counts per set and the eval URLs. None when data.world is off."""
    w = cfg.data.world
    if not w.enabled:
        return None
    url = sets.folder(cfg.data.output)
    marker = storage.join(url, storage.COMPLETE)
    key = _key(cfg)
    if storage.exists(marker):
        info = storage.read_json(marker)
        if info.get("key") == key:
            return info
    storage.remove(marker)
    made = build.build(w, int(cfg.data.seed))
    counts = {name: len(made[name]) for name in TRAIN}
    counts["pretrain_documents"] = _jsonl(storage.join(url, TRAIN["pretrain"]), documents(made["pretrain"]))
    for name in ("sft", "pairs", "rs", "ppo"):
        _jsonl(storage.join(url, TRAIN[name]), made[name])
    for name in sets.EVAL:
        counts[f"eval_{name}"] = _jsonl(sets.eval_file(cfg.data.output, name), made[f"eval_{name}"])
    info = {"key": key, "counts": counts, "url": url,
            "files": {name: storage.join(url, file) for name, file in TRAIN.items()},
            "eval": {name: sets.eval_file(cfg.data.output, name) for name in sets.EVAL}}
    storage.mark_complete(url, info)
    return info


def mixed(cfg: Config) -> Config:
    """`cfg` with the world's files added as sources (a copy; `cfg` itself when the world is off). The data hash is
    the caller's to take from `cfg`: data.world is in it already."""
    if not cfg.data.world.enabled:
        return cfg
    url = sets.folder(cfg.data.output)
    d = to_dict(cfg)
    data = d["data"]

    def src(kind: str, **more: Any) -> dict[str, Any]:
        return {"name": NAME, "path": storage.join(url, TRAIN[kind]), "format": "jsonl", **more}

    data["sources"] = [*data["sources"], src("pretrain", text_field="text", weight=cfg.data.world.weight)]
    data["sft"]["sources"] = [*data["sft"]["sources"], src("sft")]
    data["preference"]["sources"] = [*data["preference"]["sources"], src("pairs")]
    # The safety tag comes with each prompt record; the source's own flag is only the default.
    data["prompts"]["sources"] = [*data["prompts"]["sources"],
                                  *(src(s, name=f"{NAME}_{s}", text_field="prompt", split=s) for s in ("rs", "ppo"))]
    return from_dict(d)
