"""Dedup steps: reducers find exact duplicates and confirmed near-duplicate pairs per partition; the cluster step
joins the pairs (union-find) and writes the dropped ids by pack group."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.data_prep.clean import (
    EXACT,
    NEAR,
    candidate_pairs,
    components,
    exact_duplicates,
    group_of,
    similar,
    uniq,
)
from kubellama.components.data_prep.fanout import file_of
from kubellama.components.data_prep.steps.transfer import load_npz, read_range, read_rows, save_npz
from kubellama.components.data_prep.steps.workdir import check_plan, read_plan
from kubellama.components.data_prep.steps.worker import input_errors, worker_files, worker_stats
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

DROP = np.dtype([("doc", "<u8"), ("reason", "u1")])
REASONS = {1: "dup_exact", 2: "dup_near"}


def _signatures(workers: list[tuple[str, dict]], refs: np.ndarray, perm: int) -> np.ndarray:
    """Signatures (uint32[len(refs), perm]) of sorted signature references (worker << 40 | row)."""
    out = np.zeros((len(refs), perm), dtype=np.uint32)
    owner = (refs >> np.uint64(40)).astype(np.int64)
    for w in np.unique(owner):
        sel = np.flatnonzero(owner == w)
        rows = (refs[sel] & np.uint64((1 << 40) - 1)).astype(np.int64)
        out[sel] = read_rows(storage.join(workers[w][0], "sigs.bin"), rows, perm)
    return out


def reduce_partition(workers: list[tuple[str, dict]], p: int, perm: int, threshold: float) -> dict[str, Any]:
    """Partition `p` of every worker's hashes and band keys: exact duplicates and confirmed near-duplicate pairs."""
    exact = np.concatenate([read_range(storage.join(w, "exact.bin"), EXACT, lay["exact"][p], lay["exact"][p + 1])
                            for w, lay in workers])
    near = np.concatenate([read_range(storage.join(w, "near.bin"), NEAR, lay["near"][p], lay["near"][p + 1])
                           for w, lay in workers])
    drops = exact_duplicates(exact) if len(exact) else np.zeros(0, dtype=np.uint64)
    a, b, ra, rb = candidate_pairs(near)
    if len(a):
        refs = uniq(np.concatenate([ra, rb]))
        sigs = _signatures(workers, refs, perm)
        ok = similar(sigs[np.searchsorted(refs, ra)], sigs[np.searchsorted(refs, rb)], threshold)
        confirmed = (a[ok], b[ok])
    else:
        confirmed = (a, b)
    return {"exact": drops, "a": confirmed[0], "b": confirmed[1],
            "stats": {"partition": p, "hashes": len(exact), "band_keys": len(near), "candidates": len(a),
                      "confirmed": len(confirmed[0]), "bytes": exact.nbytes + near.nbytes}}


def dedup_step(cfg: Config, work: str, index: int, plan_id: str = "") -> list[dict]:
    """Reducer `index`: the partitions p with p mod reducers == index, each into `<work>/dedup/p<p>.npz`."""
    if storage.is_complete(cfg.data.output):
        return []
    plan = read_plan(work)
    check_plan(plan, plan_id)
    workers = worker_files(work, plan)
    done = []
    for p in range(index, plan["partitions"], plan["reducers"]):
        url = storage.join(work, "dedup", f"p{p:05d}.npz")
        if storage.exists(url):
            continue
        started = time.time()
        res = reduce_partition(workers, p, plan["perm"], cfg.data.clean.near_threshold)
        res["stats"].update(started=started, ended=time.time(), seconds=round(time.time() - started, 3))
        save_npz(url, exact=res["exact"], a=res["a"], b=res["b"], stats=np.array(json.dumps(res["stats"])))
        done.append(res["stats"])
    log.info("data prep: dedup reducer %d: %d partitions", index, len(done))
    return done


def cluster_step(cfg: Config, work: str, plan_id: str = "") -> dict | None:
    """Join the reducers' pairs into clusters; write the dropped ids by pack group into `<work>/cluster/`."""
    d = cfg.data
    if storage.is_complete(d.output):
        return None
    plan = read_plan(work)
    check_plan(plan, plan_id)
    folder = storage.join(work, "cluster")
    if storage.is_complete(folder):
        return storage.read_json(storage.join(folder, "stats.json"))
    started = time.time()
    stats = worker_stats(work, plan)
    input_errors(stats, d.error_samples).check(d.max_error_rate)  # before any packing
    parts = []
    for p in range(plan["partitions"]):
        url = storage.join(work, "dedup", f"p{p:05d}.npz")
        if not storage.exists(url):
            raise KubellamaError(f"dedup partition {p} has not been reduced ({url} is missing)")
        parts.append(load_npz(url))
    empty = np.zeros(0, dtype=np.uint64)
    exact = uniq(np.concatenate([empty] + [x["exact"] for x in parts]))
    a = np.concatenate([empty] + [x["a"] for x in parts])
    b = np.concatenate([empty] + [x["b"] for x in parts])
    nodes, roots = components(a, b)
    near = np.setdiff1d(nodes[roots != nodes], exact)
    drops = np.zeros(len(exact) + len(near), dtype=DROP)
    drops["doc"] = np.concatenate([exact, near])
    drops["reason"] = np.concatenate([np.full(len(exact), 1), np.full(len(near), 2)])
    groups = group_of(drops["doc"], plan["seed"], plan["groups"])
    order = np.lexsort((drops["doc"], groups))
    drops, groups = drops[order], groups[order]
    storage.write_bytes(storage.join(folder, "drops.bin"), drops.tobytes())
    source = np.array([f["source"] for f in plan["files"]], dtype=np.int64)[file_of(drops["doc"])] if len(drops) \
        else np.zeros(0, dtype=np.int64)
    by_source = {str(s): {REASONS[r]: int(((source == s) & (drops["reason"] == r)).sum()) for r in REASONS}
                 for s in range(len(plan["sources"]))}
    reduced = [json.loads(str(x["stats"])) for x in parts]
    out = {"groups": np.searchsorted(groups, np.arange(plan["groups"] + 1)).tolist(), "dropped": by_source,
           "clusters": len(uniq(roots)), "pairs": len(a),
           "partitions": reduced, "started": started, "ended": time.time()}
    storage.write_json(storage.join(folder, "stats.json"), out)
    storage.mark_complete(folder)
    log.info("data prep: dedup: %d exact and %d near duplicates (%d pairs in %d clusters)", len(exact), len(near),
             len(a), out["clusters"])
    return out
