"""Packer step: a pack group's kept documents from every worker, mixed by source weight and packed into token
shards published straight into `<output>/pretrain/`."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np

from kubellama.components.core.data.shards import ShardWriter
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.data_prep import pack
from kubellama.components.data_prep.steps.dedup import DROP
from kubellama.components.data_prep.steps.transfer import chunks, copy_range, publish_file, read_range, save_npz
from kubellama.components.data_prep.steps.workdir import check_plan, read_plan
from kubellama.components.data_prep.steps.worker import DOC, worker_files
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")


def pack_group(cfg: Config, work: str, plan: dict, workers: list[tuple[str, dict]], drops_at: list[int], g: int,
               tmp: str) -> dict:
    """Group `g`: its kept documents from every worker, mixed and packed into shards in `<output>/pretrain/`."""
    d = cfg.data
    started = time.time()
    dtype = np.dtype(plan["tokenizer"]["token_dtype"])
    tokens_path = os.path.join(tmp, f"g{g}.tokens")
    parts, base = [], 0
    with open(tokens_path, "wb") as f:
        for prefix, lay in workers:
            docs = read_range(storage.join(prefix, "docs.bin"), DOC, lay["docs"][g], lay["docs"][g + 1]).copy()
            t0, t1 = lay["tokens"][g], lay["tokens"][g + 1]
            copy_range(storage.join(prefix, "tokens.bin"), t0 * dtype.itemsize, t1 * dtype.itemsize, f)
            docs["offset"] = docs["offset"] - np.uint64(t0) + np.uint64(base)
            base += t1 - t0
            parts.append(docs)
    docs = np.concatenate(parts)
    docs = docs[np.argsort(docs["doc"], kind="stable")]
    dropped = read_range(storage.join(work, "cluster", "drops.bin"), DROP, drops_at[g], drops_at[g + 1])
    docs = docs[~np.isin(docs["doc"], dropped["doc"])]
    weights = [s["weight"] for s in plan["sources"]]
    order = pack.mix_order(docs["source"], weights, np.random.default_rng([plan["seed"], g]))
    vocab = plan["tokenizer"]["vocab_size"]
    shard_dir = os.path.join(tmp, f"g{g}")
    writer = ShardWriter(shard_dir, d.seq_len, vocab, shard_rows=max(1, d.shard_tokens // d.seq_len))
    packer = pack.Packer(writer, d.seq_len)
    hist = np.zeros(vocab, dtype=np.int64)
    fd = os.open(tokens_path, os.O_RDONLY)
    try:
        # Random order over the group: a read per document (a memory map's pages would count as our memory).
        mixed = docs[order]
        for i, j in chunks(mixed["length"]):
            chunk = mixed[i:j]
            flat = np.frombuffer(b"".join(os.pread(fd, n * dtype.itemsize, o * dtype.itemsize) for o, n in
                                          zip(chunk["offset"].tolist(), chunk["length"].tolist())), dtype=dtype)
            packer.add(flat)
            hist += np.bincount(flat, minlength=vocab)[:vocab]
    finally:
        os.close(fd)
    tail = packer.close()
    manifest = writer.close()
    shards = []
    for k, s in enumerate(manifest["shards"]):
        name = f"shard_g{g:05d}_{k:05d}"
        publish_file(os.path.join(shard_dir, s["name"] + ".bin"), storage.join(d.output, "pretrain", name + ".bin"))
        shards.append({**s, "name": name})
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.remove(tokens_path)
    per_source = {str(s): {"docs": int((mixed["source"] == s).sum()),
                           "tokens": int(mixed["length"][mixed["source"] == s].sum())} for s in range(len(weights))}
    result = {"group": g, "shards": shards, "rows": manifest["rows"], "documents": len(order),
              "tokens": int(mixed["length"].sum()), "bytes": int(mixed["bytes"].sum()), "dropped_tail": int(tail),
              "sources": per_source, "started": started, "ended": time.time()}
    save_npz(storage.join(work, "pack", f"g{g:05d}.npz"), hist=hist)
    storage.write_json(storage.join(work, "pack", f"g{g:05d}.json"), result)  # last: the group is done
    return result


def pack_step(cfg: Config, work: str, index: int, plan_id: str = "") -> list[dict]:
    """Packer `index`: the groups g with g mod N == index."""
    if storage.is_complete(cfg.data.output):
        return []
    plan = read_plan(work)
    check_plan(plan, plan_id)
    cluster = storage.join(work, "cluster")
    if not storage.is_complete(cluster):
        raise KubellamaError(f"data prep dedup clustering has not finished ({cluster} has no {storage.COMPLETE})")
    drops_at = storage.read_json(storage.join(cluster, "stats.json"))["groups"]
    workers = worker_files(work, plan)
    done = []
    with tempfile.TemporaryDirectory(prefix=f"kubellama-data-p{index}-") as tmp:
        for g in range(index, plan["groups"], plan["parallelism"]):
            if storage.exists(storage.join(work, "pack", f"g{g:05d}.json")):
                continue
            done.append(pack_group(cfg, work, plan, workers, drops_at, g, tmp))
            log.info("data prep: packer %d: group %d: %d documents, %d rows", index, g, done[-1]["documents"],
                     done[-1]["rows"])
    return done
