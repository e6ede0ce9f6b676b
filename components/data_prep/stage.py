"""Stage `data_prep`: clean the corpus, train (or take) the tokenizer, write token shards and alignment datasets.

The pretraining corpus goes through the steps of components/data_prep/steps.py: a plan (work units, the
tokenizer trained on a sample across all inputs), workers that clean, scrub PII, filter, sign (MinHash) and
tokenize their share in one streaming pass, global exact and near dedup by partitioned reducers and union-find,
packers that mix the kept documents by source weight into token shards, and a merge. `data.parallelism=N` spreads
them over N pods in a pipeline; here they run in this process, or with `--workers-as-processes` in N local
processes: the same split, the same output. SFT dialogs, preference pairs and prompt sets, which are small, are
prepared by the merge in one process, SFT and preference records cleaned as far as fits (clean.RecordCleaner).

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
import unicodedata
from collections import Counter
from contextlib import ExitStack
from typing import Any, Callable, Iterator, Sequence

from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.cli import guarded, parser
from kubellama.components.core.recipe.config import load_config, to_dict
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.data_prep import steps
from kubellama.components.core.data.chat import SftPacker, chain, encode_dialog, sft_writer, to_messages, turns
from kubellama.components.data_prep.clean import RecordCleaner
from kubellama.components.data_prep.preference import flag, prompt_key, synthetic_safety_pair, to_pair
from kubellama.components.core.data.readers import ErrorLog, list_files, read_records
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

SPLITS = ("rs", "ppo", "eval")
SFT_SPLITS = ("train", "eval")


def _records(src: Any, errors: ErrorLog, clean: str = "") -> Iterator[tuple[dict, str]]:
    """(record, where) of a source, at most `src.limit` of them; `clean` names the record cleaning the run set up
    on `errors` for this kind of record (clean.RecordCleaner: PII scrubbing, exact dedup), whose drops are left out."""
    cleaner = errors.cleaners.get(clean) if clean else None
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


# --- datasets --------------------------------------------------------------------------------------------------

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


def _prompt_records(cfg: Config, src: Any, errors: ErrorLog) -> Iterator[tuple[int, bool, str]]:
    """(record number, safety tag, prompt text normalised like data.clean.normalize) of prompt source `src`; records
    without a prompt or with a safety field that is not a boolean (preference.flag: `bool("false")` is True) are
    reported to `errors`."""
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
        yield n, safety, (unicodedata.normalize(form, text) if form else text).strip()


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
            for n, safety, text in _prompt_records(cfg, src, errors):
                key = " ".join(text.lower().split())
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                pid = f"{name}-{n}"
                u = _unit(pid, cfg.data.seed)
                split = src.split or ("eval" if u < p.eval_fraction else
                                      "rs" if u < p.eval_fraction + p.rs_fraction else "ppo")
                write(split, {"id": pid, "prompt": text, "safety": safety, "source": name})
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
    out = {"sft": build_sft(cfg, tok, errors) if d.sft.sources else None,
           "preference": build_preference(cfg, errors) if d.preference.sources or d.preference.synthetic_safety
           else None,
           "prompts": build_prompts(cfg, errors) if d.prompts.sources else None}
    for kind, cleaner in errors.cleaners.items():
        if out.get(kind) is not None:
            out[kind]["clean"] = cleaner.summary()
    return out


# --- entry points ----------------------------------------------------------------------------------------------

def run(cfg: Config, processes: bool = False) -> dict:
    """The whole stage on this machine: the steps in this process, or each phase's tasks in `data.parallelism`
    processes (`processes`). A content-addressed output that is already complete is reused."""
    cfg = runs.bind(cfg, "data_prep")
    if steps.reusable(cfg):
        # Content-addressed: this folder is the output of exactly this data config, already finished.
        log.info("data prep: %s already holds the output of this data config; nothing to do", cfg.data.output)
        return {**summary(storage.read_json(storage.join(cfg.data.output, "report.json"))), "reused": True}
    return steps.run_local(cfg, processes)


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
        s["sft_examples"] = sum(rep["sft"]["sources"].values())  # source dialogs, chained ones not counted
    if rep.get("preference"):
        s["preference_pairs"] = rep["preference"]["train"] + rep["preference"]["eval"]
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("data-prep", "Clean the corpus, train the tokenizer, write token shards and datasets.")
    p.add_argument("--workers-as-processes", action="store_true",
                   help="run data.parallelism workers (and packers, reducers) as parallel local processes: the "
                        "split a pipeline runs as pods, on this machine")
    args = p.parse_args(argv)

    def go() -> int:
        run(load_config(args.overrides), args.workers_as_processes)
        return 0

    # Progress to stderr for this call only: a handler left on the root logger would outlive the stream it holds
    # (the CLI can run in-process, under a caller that swaps sys.stderr).
    root = logging.getLogger()
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
        level, root.level = root.level, logging.INFO
    try:
        return guarded(go)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(level)
