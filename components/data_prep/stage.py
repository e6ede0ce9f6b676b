"""Stage `data_prep`: clean the corpus, train (or take) the tokenizer, write token shards and alignment datasets.

Passes over the pretraining sources, all streaming:
1. read -> normalise, scrub PII, filter (worker processes) -> exact / near dedup (here) -> cleaned text spilled to a
   local temporary folder, one file per source;
2. train the SentencePiece BPE tokenizer on a bounded sample of the cleaned text (or take data.tokenizer.model);
3. mix the sources by weight (up-sampling repeats a source) -> tokenize (worker processes) -> pack into shards.
Then SFT dialogs, preference pairs and prompt sets, which are small, are prepared in this process.

Output under data.output (local or s3://): tokenizer.model, tokenizer.sha256, pretrain/ and sft/{train,eval}/ (token
shard sets), sft/dialogs/{train,eval}.jsonl, preference/{train,eval}.jsonl, prompts/{rs,ppo,eval}.jsonl,
report.json, report.md, report.html; every folder gets its `_COMPLETE` marker last, the output folder itself after
everything else.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import unicodedata
from collections import Counter
from contextlib import ExitStack
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from components.core import runs, storage
from components.core.cli import stage_main
from components.core.config import to_dict
from components.core.errors import KubellamaError
from components.core.shards import ShardWriter
from components.core.tokenizer import Tokenizer
from components.data_prep import pack, report as reporting
from components.data_prep.chat import SftPacker, chain, encode_dialog, sft_writer, to_messages, turns
from components.data_prep.clean import Deduper, clean_batch
from components.data_prep.parallel import WorkerPool, worker_count
from components.data_prep.preference import prompt_key, synthetic_safety_pair, to_pair
from components.data_prep.readers import ErrorLog, list_files, read_records
from conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

SPLITS = ("rs", "ppo", "eval")
SFT_SPLITS = ("train", "eval")


def _records(src: Any, errors: ErrorLog) -> Iterator[tuple[dict, str]]:
    n = 0
    for f in list_files(src.path, src.name):
        for rec, where in read_records(f, errors, src.format, src.text_field, src.text_split):
            yield rec, where
            n += 1
            if src.limit and n >= src.limit:
                return


def _source_texts(src: Any, errors: ErrorLog, stats: dict[str, Any]) -> Iterator[str]:
    for rec, where in _records(src, errors):
        text = rec.get(src.text_field)
        if not isinstance(text, str):
            errors.bad(where, f"missing or non-string field '{src.text_field}'")
            continue
        errors.ok()
        stats["docs_in"] += 1
        stats["chars_in"] += len(text)
        yield text


def _unit(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (splits that do not move when data is added)."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def _read_spill(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# --- pass 1: clean and dedup ---------------------------------------------------------------------------------

def clean_sources(cfg: Config, tmp: str, errors: ErrorLog, pool: WorkerPool) -> tuple[list[dict], dict]:
    d = cfg.data
    opts = {**to_dict(d.clean), "seed": d.seed}
    dedup = Deduper(os.path.join(tmp, "signatures.bin"), d.clean.minhash_perm, d.clean.minhash_bands,
                    d.clean.near_threshold, d.clean.dedup_exact, d.clean.dedup_near)
    pii: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    sources = []
    try:
        for i, src in enumerate(d.sources):
            name = src.name or f"source{i}"
            if any(s["name"] == name for s in sources):
                raise KubellamaError(f"data.sources: two sources are named '{name}'")
            stats: dict[str, Any] = {"name": name, "path": src.path, "weight": float(src.weight), "docs_in": 0,
                                     "chars_in": 0, "docs": 0, "chars": 0, "dropped": Counter(),
                                     "spill": os.path.join(tmp, f"clean_{i}.jsonl")}
            started, next_log = time.time(), 50_000
            with open(stats["spill"], "w", encoding="utf-8") as spill:
                batches = pack.batched(_source_texts(src, errors, stats))
                for res in pool.map(clean_batch, batches, args=(opts,)):
                    pii.update(res["pii"])
                    for j, text in enumerate(res["texts"]):
                        reason = res["reasons"][j] or dedup.check(
                            int(res["hashes"][j]), res["sigs"][j] if res["has_sig"][j] else None)
                        if reason:
                            stats["dropped"][reason] += 1
                            continue
                        spill.write(json.dumps(text, ensure_ascii=False) + "\n")
                        stats["docs"] += 1
                        stats["chars"] += len(text)
                    if stats["docs_in"] >= next_log:
                        next_log += 50_000
                        log.info("source %s: %d documents read, %d kept", name, stats["docs_in"], stats["docs"])
            dropped.update(stats["dropped"])
            log.info("source %s: %d documents in, %d kept (%s), %.1fs", name, stats["docs_in"], stats["docs"],
                     dict(stats["dropped"]) or "none dropped", time.time() - started)
            sources.append(stats)
    finally:
        dedup.close()
    clean = {"pii": {k: pii.get(k, 0) for k in ("email", "phone", "ip", "card")},
             "dropped": {k: dropped.get(k, 0) for k in
                         ("too_short", "too_long", "low_alpha", "repetitive", "dup_exact", "dup_near")},
             "dedup_index_bytes": dedup.nbytes}
    for s in sources:
        s["dropped"] = dict(s["dropped"])
    return sources, clean


def mixed_docs(sources: list[dict], seed: int) -> Iterator[tuple[str, str]]:
    """(source name, text) of every source repeated by its weight, interleaved at random in proportion.

    weight 2.5 = every document twice plus an evenly spread half once more; weight 0 leaves a source out.
    """
    def stream(s: dict) -> Iterator[str]:
        full, frac = int(s["weight"]), s["weight"] - int(s["weight"])
        for _ in range(full):
            yield from _read_spill(s["spill"])
        for j, text in enumerate(_read_spill(s["spill"])):
            if math.floor((j + 1) * frac) > math.floor(j * frac):  # at j = n - 1: floor(n * frac)
                yield text

    # The same float expression as in stream(), so the planned count is exactly what it yields.
    remaining = np.array([int(s["weight"]) * s["docs"] + math.floor(s["docs"] * (s["weight"] - int(s["weight"])))
                          for s in sources], dtype=np.float64)
    for s, n in zip(sources, remaining):
        s["docs_mixed"] = int(n)
    streams = [stream(s) for s in sources]
    rng = np.random.default_rng(seed)
    while remaining.sum() > 0:
        i = int(np.searchsorted(np.cumsum(remaining), rng.random() * remaining.sum(), side="right"))
        i = min(i, len(sources) - 1)
        if remaining[i] <= 0:
            continue
        remaining[i] -= 1
        yield sources[i]["name"], next(streams[i])


def _training_texts(sources: list[dict], cfg: Config) -> Iterator[str]:
    """Cleaned pretraining text, round robin over sources; then SFT dialog text if there is room."""
    streams = [_read_spill(s["spill"]) for s in sources]
    while streams:
        for st in list(streams):
            text = next(st, None)
            if text is None:
                streams.remove(st)
            else:
                yield text
    for src in cfg.data.sft.sources:
        for rec, _ in _records(src, ErrorLog(0)):
            try:
                yield "\n".join(m["content"] for m in to_messages(rec))
            except KubellamaError:
                continue


# --- tokenizer -------------------------------------------------------------------------------------------------

def make_tokenizer(cfg: Config, sources: list[dict], workers: int) -> tuple[bytes, dict]:
    t = cfg.data.tokenizer
    started = time.time()
    if t.model:
        data = storage.read_bytes(t.model)
        info = {"trained": False, "from": t.model}
    else:
        data = pack.train_tokenizer(_training_texts(sources, cfg), t.vocab_size, t.character_coverage,
                                    t.hard_vocab_limit, workers, t.train_chars)
        info = {"trained": True, "train_chars_limit": t.train_chars}
    flags = pack.model_flags(data)
    if flags["vocab_size"] > cfg.model.vocab_size:
        raise KubellamaError(f"tokenizer vocabulary ({flags['vocab_size']}) is larger than model.vocab_size "
                             f"({cfg.model.vocab_size})")
    info.update(flags, sha256=hashlib.sha256(data).hexdigest(), seconds=round(time.time() - started, 2))
    log.info("tokenizer: %s, vocabulary %d, %.1fs", "trained" if info["trained"] else f"from {t.model}",
             flags["vocab_size"], info["seconds"])
    return data, info


# --- datasets --------------------------------------------------------------------------------------------------

def build_pretrain(cfg: Config, sources: list[dict], tok: Tokenizer, tok_url: str, model_path: str,
                   pool: WorkerPool) -> dict:
    d = cfg.data
    url = storage.join(d.output, "pretrain")
    writer = ShardWriter(url, d.seq_len, tok.vocab_size,
                                      shard_rows=max(1, d.shard_tokens // d.seq_len))
    started = time.time()
    res = pack.tokenize_and_pack(mixed_docs(sources, d.seed), model_path, writer, d.seq_len, pool, tok.vocab_size)
    mix = {s["name"]: {"weight": s["weight"], "docs": s["docs_mixed"], "tokens": res["per_tag"].get(s["name"], 0)}
           for s in sources}
    manifest = writer.close(tokenizer=tok_url, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size,
                            sources=mix, documents=res["docs"], dropped_tail_tokens=res["dropped_tail"])
    seconds = time.time() - started
    hist = res["histogram"]
    text_tokens = res["tokens"] - 2 * res["docs"]
    log.info("pretrain: %d tokens in %d rows, %.0f tokens/s", manifest["tokens"], manifest["rows"],
             res["tokens"] / max(seconds, 1e-9))
    return {"url": url, "rows": manifest["rows"], "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
            "documents": res["docs"], "dropped_tail_tokens": res["dropped_tail"], "mix": mix,
            "tokens_per_second": round(res["tokens"] / max(seconds, 1e-9)),
            "bytes_per_token": round(res["bytes"] / max(text_tokens, 1), 3),
            "vocab_used": round(float((hist > 0).mean()), 4),
            "top_pieces": [tok.sp.id_to_piece(int(i)) for i in np.argsort(-hist)[:10] if hist[i] > 0]}


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
            for n, (rec, where) in enumerate(_records(src, errors)):
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


@contextlib.contextmanager
def jsonl_splits(url: str, splits: Sequence[str], counts: Counter[str]) -> Iterator[Callable[[str, dict], None]]:
    """write(split, record) into url/<split>.jsonl; each file is published whole, the folder marked last."""
    storage.remove(storage.join(url, storage.COMPLETE))
    with ExitStack() as stack:
        files = {s: stack.enter_context(storage.atomic_write(storage.join(url, f"{s}.jsonl"))) for s in splits}

        def write(split: str, rec: dict) -> None:
            files[split].write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
            counts[split] += 1

        yield write
    storage.mark_complete(url, dict(counts))


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
            for n, (rec, where) in enumerate(_records(src, errors)):
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
            for n, _, text in _prompt_records(cfg, src, errors):
                key = " ".join(text.casefold().split())
                if key not in seen:
                    seen.add(key)
                    emit(synthetic_safety_pair(text, _unit(f"{name}-{n}", cfg.data.seed)), name, n)
    log.info("preference: %d train, %d eval pairs", counts["train"], counts["eval"])
    return {"url": url, "train": counts["train"], "eval": counts["eval"], "safety_prompts": counts["safety"],
            "synthetic": counts["synthetic"], "dropped_unsafe_chosen": counts["dropped_unsafe_chosen"],
            "ratings": dict(ratings)}


PROMPT_FIELDS = ("prompt", "instruction", "question", "value", "text")


def prompt_text(rec: dict, field: str) -> str | None:
    for key in (field, *PROMPT_FIELDS):
        if isinstance(rec.get(key), str) and rec[key].strip():
            text = rec[key]
            if key == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
                text += "\n\n" + rec["input"]
            return text
    if isinstance(rec.get("messages"), list) or isinstance(rec.get("conversations"), list):
        users = [m["content"] for m in to_messages(rec) if m["role"] == "user"]
        return users[-1] if users else None
    return None


def _prompt_records(cfg: Config, src: Any, errors: ErrorLog) -> Iterator[tuple[int, dict, str]]:
    """(record number, record, prompt text normalised like data.clean.normalize) of prompt source `src`; records
    without a prompt are reported to `errors`."""
    for n, (rec, where) in enumerate(_records(src, errors)):
        try:
            text = prompt_text(rec, src.text_field)
        except KubellamaError as exc:
            errors.bad(where, "invalid prompt record", str(exc))
            continue
        if text is None:
            errors.bad(where, "missing prompt field", f"tried {src.text_field}, {', '.join(PROMPT_FIELDS)}")
            continue
        errors.ok()
        form = cfg.data.clean.normalize
        yield n, rec, (unicodedata.normalize(form, text) if form else text).strip()


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
            for n, rec, text in _prompt_records(cfg, src, errors):
                key = " ".join(text.lower().split())
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                pid = f"{name}-{n}"
                u = _unit(pid, cfg.data.seed)
                split = src.split or ("eval" if u < p.eval_fraction else
                                      "rs" if u < p.eval_fraction + p.rs_fraction else "ppo")
                safety = bool(rec.get("safety", src.safety)) if isinstance(rec.get("safety", False), bool) \
                    else src.safety
                write(split, {"id": pid, "prompt": text, "safety": safety, "source": name})
                counts[f"{split}_safety"] += safety
    log.info("prompts: %s", {s: counts[s] for s in SPLITS})
    return {"url": url, **{s: counts[s] for s in SPLITS}, **{f"{s}_safety": counts[f"{s}_safety"] for s in SPLITS},
            "duplicates": counts["duplicates"]}


# --- entry points ----------------------------------------------------------------------------------------------

def run(cfg: Config) -> dict:
    addressed = not cfg.data.output
    cfg = runs.bind(cfg, "data_prep")
    d = cfg.data
    out = d.output
    if addressed and storage.is_complete(out) and storage.exists(storage.join(out, "report.json")):
        # Content-addressed: this folder is the output of exactly this data config, already finished.
        log.info("data prep: %s already holds the output of this data config; nothing to do", out)
        return {**summary(storage.read_json(storage.join(out, "report.json"))), "reused": True}
    workers = worker_count(d.workers)
    started = time.time()
    storage.remove(storage.join(out, storage.COMPLETE))
    storage.makedirs(out)
    errors = ErrorLog(d.error_samples)
    rep: dict[str, Any] = {"output": out, "workers": workers, "seq_len": d.seq_len}
    with tempfile.TemporaryDirectory(prefix="kubellama-data-") as tmp, WorkerPool(workers) as pool:
        sources, rep["clean"] = clean_sources(cfg, tmp, errors, pool)
        errors.check(d.max_error_rate)
        model_bytes, rep["tokenizer"] = make_tokenizer(cfg, sources, workers)
        tok_url = storage.join(out, "tokenizer.model")
        storage.write_bytes(tok_url, model_bytes)
        storage.write_text(storage.join(out, "tokenizer.sha256"), f"{rep['tokenizer']['sha256']}  tokenizer.model\n")
        model_path = os.path.join(tmp, "tokenizer.model")
        with open(model_path, "wb") as f:
            f.write(model_bytes)
        tok = Tokenizer(model_bytes=model_bytes)
        rep["tokenizer"]["url"] = tok_url
        rep["pretrain"] = build_pretrain(cfg, sources, tok, tok_url, model_path, pool) if sources else None
        if rep["pretrain"]:
            rep["tokenizer"]["bytes_per_token"] = rep["pretrain"]["bytes_per_token"]
            rep["tokenizer"]["vocab_used"] = rep["pretrain"]["vocab_used"]
    rep["sources"] = [{k: v for k, v in s.items() if k != "spill"} for s in sources]
    rep["sft"] = build_sft(cfg, tok, errors) if d.sft.sources else None
    rep["preference"] = build_preference(cfg, errors) if d.preference.sources or d.preference.synthetic_safety \
        else None
    rep["prompts"] = build_prompts(cfg, errors) if d.prompts.sources else None
    rep["errors"] = errors.summary()
    rep["seconds"] = round(time.time() - started, 2)
    errors.check(d.max_error_rate)
    reporting.write(rep)
    storage.mark_complete(out, {"tokenizer_sha256": rep["tokenizer"]["sha256"]})
    log.info("data prep done in %.1fs: %s", rep["seconds"], out)
    return summary(rep)


def summary(rep: dict) -> dict:
    """The small JSON-able result: URLs and headline numbers."""
    out = rep["output"]
    s: dict[str, Any] = {"output": out, "tokenizer": rep["tokenizer"]["url"],
                         "report_json": storage.join(out, "report.json"), "report_md": storage.join(out, "report.md"),
                         "report_html": storage.join(out, "report.html"),
                         "vocab_size": rep["tokenizer"]["vocab_size"],
                         "input_errors": rep["errors"]["errors"], "seconds": rep["seconds"]}
    for key in ("pretrain", "sft", "preference", "prompts"):
        if rep.get(key):
            s[key] = rep[key]["url"]
    if rep.get("pretrain"):
        s["pretrain_tokens"] = rep["pretrain"]["tokens"]
        s["bytes_per_token"] = rep["pretrain"]["bytes_per_token"]
    s["dropped"] = sum(rep["clean"]["dropped"].values())
    s["pii_scrubbed"] = sum(rep["clean"]["pii"].values())
    if rep.get("sft"):
        s["sft_examples"] = rep["sft"]["examples"]
    if rep.get("preference"):
        s["preference_pairs"] = rep["preference"]["train"] + rep["preference"]["eval"]
    return s


def main(argv: Sequence[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return stage_main("data-prep", "Clean the corpus, train the tokenizer, write token shards and datasets.", run,
                      argv)
