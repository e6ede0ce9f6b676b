"""Merge step: the pretraining manifest over every group's shards, the small datasets (SFT, preference, prompts)
and the report with every worker's counts, throughput and skew; the output folder is marked complete last."""
from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from kubellama.components.core.data.shards import FORMAT
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.data_prep import report, world
from kubellama.components.data_prep.datasets import build_datasets
from kubellama.components.data_prep.steps.transfer import load_npz
from kubellama.components.data_prep.steps.workdir import check_plan, read_plan
from kubellama.components.data_prep.steps.worker import input_errors, worker_stats
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

QUALITY = ("too_short", "too_long", "low_alpha", "repetitive")
PII_KINDS = ("email", "phone", "ip", "card")
STRAGGLER = 1.5  # a worker slower than this times the median is flagged


def spread(stats: list[dict], what: str) -> dict[str, Any]:
    """Per-task throughput, skew (slowest over mean time) and stragglers (slower than STRAGGLER x the median)."""
    secs = [s["seconds"] for s in stats]
    if not secs:
        return {"tasks": [], "skew": 1.0, "stragglers": []}
    median = statistics.median(secs)
    return {"tasks": stats, "skew": round(max(secs) / max(statistics.mean(secs), 1e-9), 3),
            "stragglers": [s["index"] for s in stats if s["seconds"] > STRAGGLER * median and s["seconds"] > 1.0],
            "what": what}


def _sources(plan: dict, stats: list[dict], cluster: dict, mix: dict) -> list[dict]:
    """Per pretraining source: documents read, kept, dropped by reason (the workers' filters, then dedup)."""
    out = []
    for s, src in enumerate(plan["sources"]):
        per = [w["sources"][str(s)] for w in stats if str(s) in w["sources"]]
        deduped = cluster["dropped"][str(s)]
        reasons: Counter[str] = Counter()
        for p in per:
            reasons.update(p["dropped"])
        reasons.update({k: v for k, v in deduped.items() if v})
        out.append({"name": src["name"], "path": src["path"], "weight": src["weight"],
                    "docs_in": sum(p["docs_in"] for p in per), "chars_in": sum(p["chars_in"] for p in per),
                    "docs": sum(p["kept"] for p in per) - sum(deduped.values()),
                    "dropped": dict(sorted(reasons.items())), "docs_mixed": mix[src["name"]]["docs"]})
    return out


def _pretrain(cfg: Config, plan: dict, work: str, groups: list[dict], tok: Tokenizer, mix: dict) -> dict:
    """Publish the pretraining manifest over every group's shards; what the report says about them."""
    d = cfg.data
    shards = [s for g in groups for s in g["shards"]]
    hist = sum((load_npz(storage.join(work, "pack", f"g{g['group']:05d}.npz"))["hist"] for g in groups),
               np.zeros(tok.vocab_size, dtype=np.int64))
    documents = sum(g["documents"] for g in groups)
    text_tokens = sum(g["tokens"] for g in groups) - 2 * documents
    url = storage.join(d.output, "pretrain")
    rows = sum(s["rows"] for s in shards)
    manifest = {"format": FORMAT, "dtype": np.dtype(plan["tokenizer"]["token_dtype"]).str, "seq_len": d.seq_len,
                "fields": {}, "shards": shards, "rows": rows, "tokens": rows * d.seq_len, "tokenizer": tok.url,
                "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "sources": mix,
                "documents": documents, "dropped_tail_tokens": sum(g["dropped_tail"] for g in groups),
                "groups": len(groups)}
    storage.write_json(storage.join(url, "manifest.json"), manifest)
    storage.mark_complete(url, {"rows": rows})
    log.info("data prep: pretrain: %d tokens in %d rows, %d shards", manifest["tokens"], rows, len(shards))
    return {"url": url, "rows": rows, "tokens": manifest["tokens"], "shards": len(shards), "groups": len(groups),
            "documents": documents, "dropped_tail_tokens": manifest["dropped_tail_tokens"], "mix": mix,
            "bytes_per_token": round(sum(g["bytes"] for g in groups) / max(text_tokens, 1), 3),
            "vocab_used": round(float((hist > 0).mean()), 4),
            "top_pieces": [tok.sp.id_to_piece(int(i)) for i in np.argsort(-hist, kind="stable")[:10] if hist[i] > 0]}


def merge_step(cfg: Config, work: str, plan_id: str = "") -> dict:
    """The pretraining manifest, the small datasets and the report; the output folder is marked complete last."""
    d = cfg.data
    out = d.output
    if storage.is_complete(out) and storage.exists(storage.join(out, "report.json")):
        return report.summary(storage.read_json(storage.join(out, "report.json")))
    started = time.time()
    plan = read_plan(work)
    check_plan(plan, plan_id)
    stats = worker_stats(work, plan)
    cluster = storage.read_json(storage.join(work, "cluster", "stats.json"))
    groups = []
    for g in range(plan["groups"]):
        url = storage.join(work, "pack", f"g{g:05d}.json")
        if not storage.exists(url):
            raise KubellamaError(f"data prep pack group {g} has not been written ({url} is missing)")
        groups.append(storage.read_json(url))
    tok = Tokenizer(storage.join(out, "tokenizer.model"))
    mix = {src["name"]: {"weight": src["weight"], "docs": sum(g["sources"][str(s)]["docs"] for g in groups),
                         "tokens": sum(g["sources"][str(s)]["tokens"] for g in groups)}
           for s, src in enumerate(plan["sources"])}
    sources = _sources(plan, stats, cluster, mix)
    pii: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    for w in stats:
        pii.update(w["pii"])
    for src in sources:
        dropped.update(src["dropped"])
    partitions = cluster["partitions"]
    rep: dict[str, Any] = {
        "output": out, "workers": stats[0]["processes"] if stats else 0, "seq_len": d.seq_len,
        "tokenizer": {**plan["tokenizer"], "url": tok.url}, "sources": sources,
        "clean": {"pii": {k: pii.get(k, 0) for k in PII_KINDS},
                  "dropped": {k: dropped.get(k, 0) for k in (*QUALITY, "dup_exact", "dup_near")},
                  "dedup": {"partitions": plan["partitions"], "confirmed_pairs": cluster["pairs"],
                            "candidate_pairs": sum(p["candidates"] for p in partitions),
                            "largest_partition_bytes": max([p["bytes"] for p in partitions] or [0])}},
        "pretrain": _pretrain(cfg, plan, work, groups, tok, mix) if groups else None}
    if rep["pretrain"]:
        rep["tokenizer"].update({k: rep["pretrain"][k] for k in ("bytes_per_token", "vocab_used")})
    errors = input_errors(stats, d.error_samples)
    # The world's files are there already (the plan step wrote them); this only reads their marker.
    rep["world"] = world.materialise(cfg)
    rep.update(build_datasets(world.mixed(cfg), tok, errors))
    rep["errors"] = errors.summary()
    errors.check(d.max_error_rate)
    rep["fanout"] = _fanout(plan, stats, cluster, groups, started)
    rep["seconds"] = rep["fanout"]["timing"]["total"]
    manifest = storage.join(out, "pretrain", "manifest.json")
    # The same lineage fields as a training stage's: what config made this, and the identity of the shards it wrote.
    data_hash = runs.manifest_hash(storage.read_json(manifest)) if storage.exists(manifest) else None
    rep["lineage"] = {"config_hash": runs.data_hash(cfg), "parent": None, "data_hash": data_hash}
    report.write(rep)
    storage.mark_complete(out, {"tokenizer_sha256": plan["tokenizer"]["sha256"]})
    log.info("data prep done in %.1fs: %s", rep["seconds"], out)
    return report.summary(rep)


def worker_metrics(w: dict | None) -> dict[str, Any]:
    """A worker's counts and throughput from its stats (what its KFP step logs as Metrics, and a report row)."""
    if not w:
        return {}
    docs_in = sum(s["docs_in"] for s in w["sources"].values())
    return {"index": w["index"], "units": w["units"], "mb": round(w["bytes"] / 1e6, 3), "docs_in": docs_in,
            "kept": sum(s["kept"] for s in w["sources"].values()),
            "tokens": sum(s["tokens"] for s in w["sources"].values()), "seconds": w["seconds"],
            "docs_per_s": round(docs_in / max(w["seconds"], 1e-9), 1),
            "mb_per_s": round(w["bytes"] / 1e6 / max(w["seconds"], 1e-9), 3),
            "errors": sum(u["errors"] for u in w["errors"])}


def _fanout(plan: dict, stats: list[dict], cluster: dict, groups: list[dict], merge_started: float) -> dict:
    """What the report says about the split: per-worker counts and throughput, skew, stragglers, phase times."""
    workers = [worker_metrics(w) for w in stats]
    ended = time.time()

    def span(items: list[dict]) -> float:
        return round(max(i["ended"] for i in items) - min(i["started"] for i in items), 3) if items else 0.0

    timing = {"plan": round(plan["ended"] - plan["started"], 3), "workers": span(stats),
              "dedup": span(cluster["partitions"] + [cluster]), "pack": span(groups),
              "merge": round(ended - merge_started, 3), "total": round(ended - plan["started"], 3)}
    timing["merge_share"] = round(timing["merge"] / max(timing["total"], 1e-9), 4)
    return {"parallelism": plan["parallelism"], "units": len(plan["units"]), "partitions": plan["partitions"],
            "reducers": plan["reducers"], "groups": plan["groups"], "plan": plan["id"],
            "workers": spread(workers, "workers"), "timing": timing}
