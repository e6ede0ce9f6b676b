"""Worker step: reads its units and, per document in one pass, cleans, scrubs, filters, hashes, signs (MinHash)
and tokenizes; writes its tokens and index by pack group and its hashes and band keys by dedup partition."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np

from kubellama.components.core.data.readers import ErrorLog, read_positioned
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import to_dict
from kubellama.components.data_prep import pack
from kubellama.components.data_prep.clean import EXACT, NEAR, group_of, part_of
from kubellama.components.data_prep.fanout import doc_ids
from kubellama.components.data_prep.parallel import WorkerPool
from kubellama.components.data_prep.steps.transfer import chunks, publish_file
from kubellama.components.data_prep.steps.workdir import check_plan, read_plan
from kubellama.components.data_prep.work import prepare_batch
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

# A kept document in a worker's index: its id, where its tokens are, its text size and its source.
DOC = np.dtype([("doc", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("bytes", "<u4"), ("source", "<u2")])


def _blocks(path: str, dtype: np.dtype, count: int) -> Any:
    """A file of records, `count` records at a time (plain reads: memory is one block)."""
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, dtype=dtype, count=count)
            if not len(block):
                return
            yield block


def partition_file(spool: str, dtype: np.dtype, field: str, parts: int, out: str, chunk: int = 1 << 16) -> list[int]:
    """Rewrite a file of records ordered by the partition of `field` (stable: spool order within a partition);
    returns where each partition starts (and the end). Streams: memory is one chunk."""
    counts = np.zeros(parts, dtype=np.int64)
    for block in _blocks(spool, dtype, chunk):
        counts += np.bincount(part_of(block[field], parts), minlength=parts)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    cursor = offsets[:-1].copy()
    with open(out, "wb") as dst:
        for block in _blocks(spool, dtype, chunk):
            p = part_of(block[field], parts)
            order = np.argsort(p, kind="stable")
            block, p = block[order], p[order]
            bounds = np.searchsorted(p, np.arange(parts + 1))
            for q in np.flatnonzero(np.diff(bounds)):
                dst.seek(int(cursor[q]) * dtype.itemsize)
                dst.write(block[bounds[q]:bounds[q + 1]].tobytes())
                cursor[q] += bounds[q + 1] - bounds[q]
    return offsets.tolist()


def _unit_docs(plan: dict, unit: dict, errors: ErrorLog, stats: dict) -> Any:
    """(document id, text) of a unit's records that have a text; malformed ones counted in `errors`."""
    src = plan["sources"][unit["source"]]
    n = 0
    for f in unit["files"]:
        url = plan["files"][f]["url"]
        for rec, where, pos in read_positioned(url, errors, src["format"], src["text_field"], src["text_split"],
                                               unit["start"], unit["end"]):
            n += 1
            text = rec.get(src["text_field"])
            if not isinstance(text, str):
                errors.bad(where, f"missing or non-string field '{src['text_field']}'")
            else:
                errors.ok()
                stats["docs_in"] += 1
                stats["chars_in"] += len(text)
                yield int(doc_ids(f, pos)), text
            if src["limit"] and n >= src["limit"]:
                return


class _WorkerFiles:
    """A worker's spools in a local folder, finished into the files the reducers and packers read."""

    def __init__(self, tmp: str, index: int, plan: dict, dtype: np.dtype, exact: bool):
        self.tmp, self.index, self.plan, self.dtype, self.exact_dedup = tmp, index, plan, dtype, exact
        self.tokens = open(os.path.join(tmp, "tokens.spool"), "wb")  # noqa: SIM115 (spools: open until finish)
        self.exact = open(os.path.join(tmp, "exact.spool"), "wb")  # noqa: SIM115
        self.near = open(os.path.join(tmp, "near.spool"), "wb")  # noqa: SIM115
        self.sigs = open(os.path.join(tmp, "sigs.bin"), "wb")  # noqa: SIM115
        self.index_parts: list[np.ndarray] = []
        self.token_count = self.sig_rows = 0

    def add(self, res: dict, source: int) -> None:
        n = len(res["docs"])
        idx = np.zeros(n, dtype=DOC)
        idx["doc"], idx["length"], idx["bytes"], idx["source"] = res["docs"], res["lengths"], res["bytes"], source
        idx["offset"] = self.token_count + np.cumsum(res["lengths"]) - res["lengths"]
        self.index_parts.append(idx)
        self.tokens.write(res["tokens"].astype(self.dtype).tobytes())
        self.token_count += int(res["lengths"].sum())
        if self.exact_dedup:
            exact = np.zeros(n, dtype=EXACT)
            exact["hash"], exact["doc"] = res["hashes"], res["docs"]
            self.exact.write(exact.tobytes())
        keys = res["keys"]
        if keys.size:
            rows = self.sig_rows + np.arange(len(keys), dtype=np.uint64)
            near = np.zeros(keys.shape, dtype=NEAR)
            near["key"] = keys
            near["doc"] = res["docs"][res["has_sig"]][:, None]
            near["ref"] = ((np.uint64(self.index) << np.uint64(40)) | rows)[:, None]
            near["band"] = np.arange(keys.shape[1])[None, :]
            self.near.write(near.ravel().tobytes())
            self.sigs.write(res["sigs"].astype(np.uint32).tobytes())
            self.sig_rows += len(keys)

    def finish(self) -> dict:
        """Write tokens.bin and docs.bin ordered by group (by id within one), exact.bin and near.bin by partition;
        return the layout: where each group and each partition starts."""
        for f in (self.tokens, self.exact, self.near, self.sigs):
            f.close()
        plan = self.plan
        idx = np.concatenate(self.index_parts) if self.index_parts else np.zeros(0, dtype=DOC)
        groups = group_of(idx["doc"], plan["seed"], plan["groups"])
        # The spool is in id order (units in order, records in file order), so a stable sort by group keeps it.
        group_tokens = np.bincount(groups, weights=idx["length"], minlength=plan["groups"]).astype(np.int64)
        token_starts = np.concatenate([[0], np.cumsum(group_tokens)])
        cursor = token_starts[:-1].copy()
        spool_path = os.path.join(self.tmp, "tokens.spool")
        isz = self.dtype.itemsize
        with open(spool_path, "rb") as src, open(os.path.join(self.tmp, "tokens.bin"), "wb") as out:
            for i, j in chunks(idx["length"]):
                chunk, g = idx[i:j], groups[i:j]
                base = int(chunk["offset"][0])
                src.seek(base * isz)
                buf = np.fromfile(src, dtype=self.dtype, count=int(chunk["offset"][-1] + chunk["length"][-1]) - base)
                for q in np.unique(g):
                    mine = chunk[g == q]
                    out.seek(int(cursor[q]) * isz)
                    out.write(b"".join(buf[o - base:o - base + n].tobytes() for o, n in
                                       zip(mine["offset"].tolist(), mine["length"].tolist())))
                    cursor[q] += int(mine["length"].sum())
        os.remove(spool_path)
        order = np.argsort(groups, kind="stable")
        idx, groups = idx[order], groups[order]
        idx["offset"] = np.cumsum(idx["length"], dtype=np.uint64) - idx["length"]
        with open(os.path.join(self.tmp, "docs.bin"), "wb") as f:
            f.write(idx.tobytes())
        layout = {"docs": np.searchsorted(groups, np.arange(plan["groups"] + 1)).tolist(),
                  "tokens": token_starts.tolist(), "sig_rows": self.sig_rows}
        for name, dtype, field in (("exact", EXACT, "hash"), ("near", NEAR, "key")):
            spool_path = os.path.join(self.tmp, f"{name}.spool")
            layout[name] = partition_file(spool_path, dtype, field, plan["partitions"],
                                          os.path.join(self.tmp, f"{name}.bin"))
            os.remove(spool_path)
        with open(os.path.join(self.tmp, "layout.json"), "w") as layout_file:
            json.dump(layout, layout_file)
        return layout


def _new_source_stats() -> dict:
    return {"docs_in": 0, "chars_in": 0, "kept": 0, "dropped": Counter(), "tokens": 0}


def worker_step(cfg: Config, work: str, index: int, procs: int, plan_id: str = "") -> dict | None:
    """Worker `index`: its units, cleaned, hashed, signed and tokenized, into `<work>/w<index>/`."""
    d = cfg.data
    if storage.is_complete(d.output):
        return None
    plan = read_plan(work)
    check_plan(plan, plan_id)
    prefix = storage.join(work, f"w{index:04d}")
    if storage.is_complete(prefix) and storage.read_json(storage.join(prefix, storage.COMPLETE)).get(
            "plan") == plan["id"]:
        return storage.read_json(storage.join(prefix, "stats.json"))
    storage.remove(prefix, recursive=True)
    started = time.time()
    opts = {**to_dict(d.clean), "seed": d.seed}
    units = [plan["units"][u] for u in plan["assign"][index]]
    per_source: dict[int, dict] = {}
    pii: Counter[str] = Counter()
    unit_logs = []
    with tempfile.TemporaryDirectory(prefix=f"kubellama-data-w{index}-") as tmp, WorkerPool(procs) as pool:
        model_path = os.path.join(tmp, "tokenizer.model")
        with open(model_path, "wb") as f:
            f.write(storage.read_bytes(storage.join(d.output, "tokenizer.model")))
        files = _WorkerFiles(tmp, index, plan, np.dtype(plan["tokenizer"]["token_dtype"]),
                            d.clean.dedup_exact)
        for unit in units:
            errors = ErrorLog(d.error_samples)
            stats = per_source.setdefault(unit["source"], _new_source_stats())
            for res in pool.map(prepare_batch, pack.batched(_unit_docs(plan, unit, errors, stats)),
                                args=(opts, model_path)):
                pii.update(res["pii"])
                stats["dropped"].update(r for r in res["reasons"] if r)
                stats["kept"] += len(res["docs"])
                stats["tokens"] += int(res["lengths"].sum())
                files.add(res, unit["source"])
            unit_logs.append({"unit": unit["id"], **errors.summary()})
            log.info("data prep: worker %d: unit %d done (%d of %d)", index, unit["id"], len(unit_logs), len(units))
        layout = files.finish()
        for name in ("tokens.bin", "docs.bin", "sigs.bin", "exact.bin", "near.bin", "layout.json"):
            publish_file(os.path.join(tmp, name), storage.join(prefix, name))
    seconds = time.time() - started
    stats = {"index": index, "units": len(units), "bytes": sum(u["size"] for u in units), "processes": procs,
             "sources": {str(s): {**v, "dropped": dict(v["dropped"])} for s, v in sorted(per_source.items())},
             "pii": dict(pii), "errors": unit_logs, "signatures": layout["sig_rows"],
             "started": started, "ended": time.time(), "seconds": round(seconds, 3)}
    storage.write_json(storage.join(prefix, "stats.json"), stats)
    storage.mark_complete(prefix, {"plan": plan["id"]})
    docs_in = sum(v["docs_in"] for v in per_source.values())
    log.info("data prep: worker %d: %d units, %d documents in, %.1fs (%.0f documents/s)", index, len(units), docs_in,
             seconds, docs_in / max(seconds, 1e-9))
    return stats


def worker_files(work: str, plan: dict) -> list[tuple[str, dict]]:
    """(prefix, layout) of every worker, checked complete."""
    out = []
    for w in range(plan["parallelism"]):
        prefix = storage.join(work, f"w{w:04d}")
        if not storage.is_complete(prefix):
            raise KubellamaError(f"data prep worker {w} has not finished ({prefix} has no {storage.COMPLETE})")
        out.append((prefix, storage.read_json(storage.join(prefix, "layout.json"))))
    return out


def worker_stats(work: str, plan: dict) -> list[dict]:
    return [storage.read_json(storage.join(work, f"w{w:04d}", "stats.json")) for w in range(plan["parallelism"])]


def input_errors(stats: list[dict], max_samples: int) -> ErrorLog:
    """The workers' input errors in one log, samples in input order (by unit, whichever worker read it)."""
    errors = ErrorLog(max_samples)
    for unit in sorted((u for s in stats for u in s["errors"]), key=lambda u: u["unit"]):
        errors.add(unit)
    return errors
