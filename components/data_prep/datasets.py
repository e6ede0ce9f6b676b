"""The small datasets of data prep, built in one process by the merge step: SFT dialogs (packed shards and JSONL),
preference pairs and prompt sets, SFT and preference records cleaned as far as fits (clean.RecordCleaner)."""
from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import Counter
from collections.abc import Iterator
from typing import Any

from kubellama.components.core.data.chat import (
    PROMPT_FIELDS,
    SftPacker,
    chain,
    encode_dialog,
    prompt_text,
    sft_writer,
    to_messages,
    turns,
)
from kubellama.components.core.data.readers import ErrorLog, list_files, read_records
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.jsonl import jsonl_splits
from kubellama.components.core.recipe.config import to_dict
from kubellama.components.data_prep.clean import RecordCleaner
from kubellama.components.data_prep.preference import flag, prompt_key, synthetic_safety_pair, to_pair
from kubellama.components.data_prep.world import is_world
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

SPLITS = ("rs", "ppo", "eval")
SFT_SPLITS = ("train", "eval")
# What a world prompt keeps beside its text: the rule's answer, its task family and whether it is harmful, so RS and
# PPO can check answers against ground truth.
KEPT = ("family", "answer", "harmful")


def _records(src: Any, errors: ErrorLog, clean: str = "") -> Iterator[tuple[dict, str]]:
    """(record, where) of a source, at most `src.limit` of them; `clean` names the record cleaning the run set up
    on `errors` for this kind of record (clean.RecordCleaner: PII scrubbing, exact dedup), whose drops are left out.
    The world's records skip it (world.is_world)."""
    cleaner = errors.cleaners.get(clean) if clean and not is_world(src.name) else None
    n = 0
    for f in list_files(src.path, src.name):
        for rec, where in read_records(f, errors, src.format, src.text_field, src.text_split):
            n += 1
            cleaned = cleaner(rec) if cleaner is not None else rec
            if cleaned is not None:
                yield cleaned, where
            if src.limit and n >= src.limit:
                return


def _unit(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (splits that do not move when data is added)."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def build_sft(cfg: Config, tok: Tokenizer, errors: ErrorLog) -> dict:
    """sft/train and sft/eval (packed shards, split per dialog by a stable hash of its id) and sft/dialogs/
    {train,eval}.jsonl (the same dialogs as messages, for Ghost Attention and its eval). Without any multi-turn
    source dialog, single-turn ones are also chained into multi-turn dialogs (`data.sft.demo_turns`)."""
    d = cfg.data
    url = storage.join(d.output, "sft")
    storage.remove(storage.join(url, storage.COMPLETE))
    shard_rows = max(1, d.shard_tokens // d.seq_len)
    packers = {s: SftPacker(sft_writer(storage.join(url, s), d.seq_len, tok.vocab_size, shard_rows), d.seq_len,
                            tok.eos_id) for s in SFT_SPLITS}
    per_source: dict[str, int] = {}
    singles: dict[str, list[list[dict]]] = {s: [] for s in SFT_SPLITS}
    counts: Counter[str] = Counter()
    multi = 0

    with jsonl_splits(storage.join(url, "dialogs"), SFT_SPLITS, counts) as write:
        for i, src in enumerate(d.sft.sources):
            name = src.name or f"sft{i}"
            per_source[name] = 0
            for n, (rec, where) in enumerate(_records(src, errors, clean="sft")):
                try:
                    msgs = to_messages(rec)
                    encoded = encode_dialog(tok, msgs)
                except KubellamaError as exc:
                    errors.bad(where, "invalid dialog", str(exc))
                    continue
                errors.ok()
                did = f"{name}-{n}"
                split = "eval" if _unit(did, d.seed) < d.sft.eval_fraction else "train"
                packers[split].add(*encoded)
                write(split, {"id": did, "source": name, "messages": msgs})
                per_source[name] += 1
                if turns(msgs) > 1:
                    multi += 1
                elif multi == 0:
                    singles[split].append(msgs)
        chained = 0
        if multi == 0 and d.sft.demo_turns >= 2:
            for split in SFT_SPLITS:
                for j, msgs in enumerate(chain(singles[split], d.sft.demo_turns, d.seed)):
                    packers[split].add(*encode_dialog(tok, msgs))
                    write(split, {"id": f"chained-{split}-{j}", "source": "chained", "messages": msgs})
                    chained += 1
    stats = {s: packers[s].close(tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, sources=per_source)
             for s in SFT_SPLITS}
    total = {k: sum(st[k] for st in stats.values()) for k in stats["train"]}
    storage.mark_complete(url, {"train": stats["train"]["examples"], "eval": stats["eval"]["examples"]})
    log.info("sft: %d train / %d held-out examples (%d multi-turn, %d chained)", stats["train"]["examples"],
             stats["eval"]["examples"], multi, chained)
    return {"url": url, **total, "train": stats["train"], "eval": stats["eval"], "multi_turn": multi,
            "chained": chained, "sources": per_source}


def build_preference(cfg: Config, errors: ErrorLog) -> dict:
    """preference/{train,eval}.jsonl: the pairs of data.preference.sources, then synthetic safety pairs made from
    the prompts of data.preference.synthetic_safety. The eval split is drawn per prompt (`prompt_key`), not per
    pair, so the RM is evaluated on prompts it never saw in training."""
    p = cfg.data.preference
    url = storage.join(cfg.data.output, "preference")
    counts: Counter[str] = Counter()
    ratings: Counter[str] = Counter()
    with jsonl_splits(url, ("train", "eval"), counts) as write:

        def emit(pair: dict, name: str, n: int) -> None:
            pair = {"id": f"{name}-{n}", "source": name, **pair}
            split = "eval" if _unit(prompt_key(pair["messages"]), cfg.data.seed) < p.eval_fraction else "train"
            write(split, pair)
            ratings[pair["rating"]] += 1
            counts["safety"] += pair["safety"]
            counts["synthetic"] += pair["synthetic"]

        for i, src in enumerate(p.sources):
            name = src.name or f"preference{i}"
            for n, (rec, where) in enumerate(_records(src, errors, clean="preference")):
                try:
                    pair = to_pair(rec, src.rating or p.default_rating, src.safety)
                except KubellamaError as exc:
                    errors.bad(where, "invalid preference pair", str(exc))
                    continue
                errors.ok()
                if p.drop_unsafe_chosen and not pair["chosen_safe"] and pair["rejected_safe"]:
                    counts["dropped_unsafe_chosen"] += 1
                    continue
                emit(pair, name, n)
        for i, src in enumerate(p.synthetic_safety):
            name = src.name or f"synthetic_safety{i}"
            seen: set[str] = set()
            for n, _, text, _rec in _prompt_records(cfg, src, errors):
                key = " ".join(text.casefold().split())
                if key not in seen:
                    seen.add(key)
                    emit(synthetic_safety_pair(text, _unit(f"{name}-{n}", cfg.data.seed)), name, n)
    log.info("preference: %d train, %d eval pairs", counts["train"], counts["eval"])
    return {"url": url, "train": counts["train"], "eval": counts["eval"], "safety_prompts": counts["safety"],
            "synthetic": counts["synthetic"], "dropped_unsafe_chosen": counts["dropped_unsafe_chosen"],
            "ratings": dict(ratings)}


def _prompt_records(cfg: Config, src: Any, errors: ErrorLog) -> Iterator[tuple[int, bool, str, dict]]:
    """(record number, safety tag, prompt text normalised like data.clean.normalize, the record) of prompt source
    `src`; records without a prompt or with a safety field that is not a boolean (preference.flag: `bool("false")` is
    True) are reported to `errors`."""
    for n, (rec, where) in enumerate(_records(src, errors)):
        try:
            text = prompt_text(rec, src.text_field)
            safety = flag(rec.get("safety"), src.safety, "safety")
        except KubellamaError as exc:
            errors.bad(where, "invalid prompt record", str(exc))
            continue
        if text is None:
            errors.bad(where, "missing prompt field", f"tried {src.text_field}, {', '.join(PROMPT_FIELDS)}")
            continue
        errors.ok()
        form = cfg.data.clean.normalize
        yield n, safety, (unicodedata.normalize(form, text) if form else text).strip(), rec


def build_prompts(cfg: Config, errors: ErrorLog) -> dict:
    p = cfg.data.prompts
    url = storage.join(cfg.data.output, "prompts")
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    with jsonl_splits(url, SPLITS, counts) as write:
        for i, src in enumerate(p.sources):
            name = src.name or f"prompts{i}"
            if src.split and src.split not in SPLITS:
                raise KubellamaError(f"prompt source '{name}': split '{src.split}' is not one of {SPLITS}")
            for n, safety, text, rec in _prompt_records(cfg, src, errors):
                key = " ".join(text.lower().split())
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                pid = f"{name}-{n}"
                u = _unit(pid, cfg.data.seed)
                split = src.split or ("eval" if u < p.eval_fraction else
                                      "rs" if u < p.eval_fraction + p.rs_fraction else "ppo")
                more = {k: rec[k] for k in KEPT if k in rec} if is_world(name) else {}
                write(split, {"id": pid, "prompt": text, "safety": safety, "source": name, **more})
                counts[f"{split}_safety"] += safety
    log.info("prompts: %s", {s: counts[s] for s in SPLITS})
    return {"url": url, **{s: counts[s] for s in SPLITS}, **{f"{s}_safety": counts[f"{s}_safety"] for s in SPLITS},
            "duplicates": counts["duplicates"]}


def build_datasets(cfg: Config, tok: Tokenizer, errors: ErrorLog) -> dict[str, Any]:
    """The SFT, preference and prompt datasets (small: one process, the merge step's), SFT and preference records
    cleaned as far as fits (clean.RecordCleaner; what it did goes into their report entries)."""
    d = cfg.data
    opts = {**to_dict(d.clean), "seed": d.seed}
    errors.cleaners = {"sft": RecordCleaner(opts), "preference": RecordCleaner(opts)} if d.clean.records else {}
    out: dict[str, Any] = {
        "sft": build_sft(cfg, tok, errors) if d.sft.sources else None,
        "preference": build_preference(cfg, errors) if d.preference.sources or d.preference.synthetic_safety else None,
        "prompts": build_prompts(cfg, errors) if d.prompts.sources else None}
    for kind, cleaner in errors.cleaners.items():
        if out.get(kind) is not None:
            out[kind]["clean"] = cleaner.summary()
    return out
