"""The fan-out's plan, made once before any worker starts: the input files and their units of work per worker
(a fair split by bytes), the dedup partitions and pack groups (from the input size alone, so the output is the same
for every number of workers), and the tokenizer, trained on a sample drawn across all inputs. A document's id is
`file << 40 | position`, so sorting by id gives the order one process would read.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from kubellama.components.core.data.chat import to_messages
from kubellama.components.core.data.readers import (
    ErrorLog,
    list_files,
    list_sized,
    parquet_row_groups,
    read_positioned,
    read_records,
    splittable,
)
from kubellama.components.core.data.shards import token_dtype
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import to_dict
from kubellama.components.data_prep import pack, world
from kubellama.components.data_prep.clean import clean_batch
from kubellama.components.data_prep.parallel import WorkerPool
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

POS_BITS = 40  # a document id: file index << POS_BITS | position in the file
MAX_FILES = 1 << (64 - POS_BITS)
WINDOW = 1 << 16  # characters of consecutive records per tokenizer sample window, at most
MIN_WINDOWS = 256  # smaller windows for a small budget, so it still spreads over the inputs


def doc_ids(file: int, positions: np.ndarray) -> np.ndarray:
    return (np.uint64(file) << np.uint64(POS_BITS)) | np.asarray(positions, dtype=np.uint64)


def file_of(docs: np.ndarray) -> np.ndarray:
    return (np.asarray(docs, dtype=np.uint64) >> np.uint64(POS_BITS)).astype(np.int64)


def _units(index: int, f: dict, split_bytes: int) -> list[dict]:
    """The units of file number `index`: byte ranges of about `split_bytes` of an uncompressed line file (JSONL,
    text), runs of row groups of a Parquet file, else the whole file (compressed, JSON arrays, YAML, paragraphs)."""
    whole = [{"files": [index], "start": 0, "end": None, "size": f["size"]}]
    if f["split"] == "bytes" and f["size"] > split_bytes:
        n = math.ceil(f["size"] / split_bytes)
        return [{"files": [index], "start": k * split_bytes, "end": min((k + 1) * split_bytes, f["size"]),
                 "size": min(split_bytes, f["size"] - k * split_bytes)} for k in range(n)]
    if f["split"] != "rows" or f["size"] <= split_bytes:
        return whole
    rows = parquet_row_groups(f["url"])
    if not rows or sum(rows) == 0:
        return whole  # unreadable: the worker that gets it reports the error
    units, first, size = [], 0, 0.0
    for g, n in enumerate(rows):
        size += f["size"] * n / sum(rows)
        if size >= split_bytes or g == len(rows) - 1:
            units.append({"files": [index], "start": first, "end": g + 1, "size": int(size)})
            first, size = g + 1, 0.0
    return units


def assign(units: list[dict], workers: int) -> list[list[int]]:
    """Unit ids per worker: largest unit first, each to the least loaded worker (ties: lowest index)."""
    heap = [(0, w) for w in range(workers)]
    out: list[list[int]] = [[] for _ in range(workers)]
    for u in sorted(units, key=lambda u: (-u["size"], u["id"])):
        load, w = heapq.heappop(heap)
        out[w].append(u["id"])
        heapq.heappush(heap, (load + u["size"], w))
    return [sorted(ids) for ids in out]


def make_plan(cfg: Config) -> dict[str, Any]:
    """Everything but the tokenizer: sources, files, units and their workers, partitions, groups; `id` names it."""
    d = cfg.data
    sources: list[dict] = []
    files: list[dict] = []
    units: list[dict] = []
    for i, src in enumerate(d.sources):
        name = src.name or f"source{i}"
        if any(s["name"] == name for s in sources):
            raise KubellamaError(f"data.sources: two sources are named '{name}'")
        sources.append({"name": name, "path": src.path, "weight": float(src.weight), "format": src.format,
                        "text_field": src.text_field, "text_split": src.text_split, "limit": int(src.limit),
                        # Read whole into the tokenizer sample: the world's text is small and must be in it.
                        "whole": world.is_world(name)})
        first = len(files)
        for url, size in list_sized(src.path, name):
            files.append({"url": url, "source": i, "size": size, "split": splittable(url, src.format,
                                                                                     src.text_split)})
        if src.limit:
            units.append({"files": list(range(first, len(files))), "start": 0, "end": None,
                          "size": sum(f["size"] for f in files[first:])})
        else:
            for k in range(first, len(files)):
                units += _units(k, files[k], d.split_bytes)
    if len(files) >= MAX_FILES:
        raise KubellamaError(f"data.sources: {len(files)} files, more than data prep can number ({MAX_FILES})")
    big = [f["url"] for f in files if f["size"] >= 1 << POS_BITS]
    if big:
        raise KubellamaError(f"{big[0]}: larger than 1 TiB; split it into smaller files")
    for k, u in enumerate(units):
        u["id"] = k
        u["source"] = files[u["files"][0]]["source"]
    n = max(1, int(d.parallelism))
    total = sum(f["size"] for f in files)
    plan = {
        "parallelism": n, "reducers": int(d.reducers) or n, "sources": sources, "files": files, "units": units,
        "assign": assign(units, n),
        # Partitions and groups from the input size alone; partitions never fewer than reducer tasks.
        "partitions": max(int(d.reducers) or n, math.ceil(total / max(1, d.partition_bytes))),
        "groups": max(1, math.ceil(total / max(1, d.group_bytes))) if units else 0,
        "seed": int(d.seed), "perm": int(d.clean.minhash_perm), "bands": int(d.clean.minhash_bands),
        "bytes": total,
    }
    if d.clean.dedup_near and d.clean.minhash_perm % d.clean.minhash_bands:
        raise KubellamaError(f"data.clean.minhash_perm ({d.clean.minhash_perm}) must be a multiple of "
                             f"data.clean.minhash_bands ({d.clean.minhash_bands})")
    plan["id"] = runs.digest({"plan": plan, "data": runs.data_hash(cfg)}, 16)
    return plan


# --- tokenizer sample ------------------------------------------------------------------------------------------

def _texts(plan: dict, f: dict, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int]]:
    """(text, position) of the records of file `f` from `start` (bytes or row groups), malformed ones skipped."""
    src = plan["sources"][f["source"]]
    for rec, _, pos in read_positioned(f["url"], ErrorLog(0), src["format"], src["text_field"], src["text_split"],
                                       start, end):
        text = rec.get(src["text_field"])
        if isinstance(text, str):
            yield text, pos


def _take(texts: Iterator[tuple[str, int]], chars: int, after: int = -1) -> tuple[list[str], int]:
    """Texts positioned after `after` until `chars` characters; and the last position taken."""
    out: list[str] = []
    size = 0
    for text, pos in texts:
        if pos <= after:
            continue
        out.append(text)
        size += len(text)
        after = pos
        if size >= chars:
            break
    return out, after


def _windows(plan: dict, f: dict, offsets: list[float], window: int) -> Iterator[str]:
    """Records of file `f` in windows of about `window` characters starting at the given byte offsets (sorted);
    windows never overlap."""
    if f["split"] == "bytes":
        after = -1
        for off in offsets:
            start = max(int(off), after + 1)
            if start >= f["size"]:
                break
            texts, after = _take(_texts(plan, f, start), window, after)
            yield from texts
    elif f["split"] == "rows" and (rows := parquet_row_groups(f["url"])):
        ends = np.cumsum(rows)
        after = -1
        for off in offsets:
            row = int(off / max(1, f["size"]) * ends[-1])
            group = int(np.searchsorted(ends, max(row, after + 1), side="right"))
            if group >= len(rows):
                break
            texts, after = _take(_texts(plan, f, group), window, max(after, row - 1))
            yield from texts
    else:
        yield from _take(_texts(plan, f), window * len(offsets))[0]


def sample_texts(plan: dict, budget: int, seed: int) -> Iterator[str]:
    """Raw pretraining texts for the tokenizer, about `budget` characters drawn across all inputs: windows of
    records at random positions, in proportion to file size times source weight (files that cannot seek give
    records from their start), or the whole corpus when it fits the budget. Sources marked `whole` (the world's
    text) are read whole first: a small source could otherwise get no window at all."""
    files = [f for f in plan["files"] if plan["sources"][f["source"]]["weight"] > 0]
    for f in files:
        if plan["sources"][f["source"]].get("whole"):
            for text, _ in _texts(plan, f):
                yield text
    files = [f for f in files if not plan["sources"][f["source"]].get("whole")]
    if sum(f["size"] for f in files) <= budget:
        for f in files:
            for text, _ in _texts(plan, f):
                yield text
        return
    weights = np.array([max(1, f["size"]) * plan["sources"][f["source"]]["weight"] for f in files], dtype=np.float64)
    cum = np.cumsum(weights)
    count = max(MIN_WINDOWS, math.ceil(budget / WINDOW))
    at = np.sort(np.random.default_rng([seed, 15]).random(count) * cum[-1])
    which = np.minimum(np.searchsorted(cum, at, side="right"), len(files) - 1)
    for k in np.unique(which):
        f = files[k]
        offsets = (at[which == k] - (cum[k] - weights[k])) / weights[k] * f["size"]
        yield from _windows(plan, f, offsets.tolist(), max(1, budget // count))


def _sft_texts(cfg: Config) -> Iterator[str]:
    for src in cfg.data.sft.sources:
        for f in list_files(src.path, src.name):
            for rec, _ in read_records(f, ErrorLog(0), src.format, src.text_field, src.text_split):
                try:
                    yield "\n".join(m["content"] for m in to_messages(rec))
                except KubellamaError:
                    continue


def make_tokenizer(cfg: Config, plan: dict, workers: int) -> tuple[bytes, dict]:
    """The tokenizer's serialized model (trained on the sample, or data.tokenizer.model) and what the report says."""
    t = cfg.data.tokenizer
    started = time.time()
    if t.model:
        data = storage.read_bytes(t.model)
        info: dict[str, Any] = {"trained": False, "from": t.model}
    else:
        opts = {**to_dict(cfg.data.clean), "seed": cfg.data.seed, "dedup_near": False}
        sampled = {"records": 0, "chars": 0}

        def cleaned() -> Iterator[str]:
            with WorkerPool(workers) as pool:
                for res in pool.map(clean_batch, pack.batched(sample_texts(plan, t.train_chars, cfg.data.seed)),
                                    args=(opts,)):
                    for text in res["texts"]:
                        if text is not None:
                            sampled["records"] += 1
                            sampled["chars"] += len(text)
                            yield text
            yield from _sft_texts(cfg)

        data = pack.train_tokenizer(cleaned(), t.vocab_size, t.character_coverage, t.hard_vocab_limit, workers,
                                    t.train_chars)
        info = {"trained": True, "train_chars_limit": t.train_chars, "sample_records": sampled["records"],
                "sample_chars": sampled["chars"]}
    flags = pack.model_flags(data)
    if flags["vocab_size"] > cfg.model.vocab_size:
        raise KubellamaError(f"tokenizer vocabulary ({flags['vocab_size']}) is larger than model.vocab_size "
                             f"({cfg.model.vocab_size})")
    info.update(flags, sha256=hashlib.sha256(data).hexdigest(), seconds=round(time.time() - started, 2),
                token_dtype=token_dtype(flags["vocab_size"]).str)
    log.info("data prep: tokenizer %s, vocabulary %d, %.1fs", "trained" if info["trained"] else f"from {t.model}",
             flags["vocab_size"], info["seconds"])
    return data, info
