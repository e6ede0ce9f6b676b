"""Data prep as steps that scale out over pods: plan -> N workers -> dedup reducers -> cluster -> N packers -> merge.

One pod runs the same steps in one process (`run_local`), or in N local processes (`--workers-as-processes`);
a pipeline with `data.parallelism=N` runs each step in its own pod (components/data_prep/component.py). Steps hand
their results over in storage, under `<output>/_work` (a local temporary folder when everything runs here):

- plan (plan.py): units of input per worker, partitions, groups, the tokenizer; `plan.json`.
- worker i (`w<i>/`): reads its units and, per document in one pass on its processes, cleans, scrubs PII, filters,
  hashes, computes the MinHash signature and band keys and tokenizes (each document once). It writes the tokens and
  a document index ordered by pack group (`tokens.bin`, `docs.bin`), the signatures (`sigs.bin`), the exact hashes
  and band keys ordered by partition (`exact.bin`, `near.bin`), `layout.json` (where each group and partition
  starts) and `stats.json` (its counts, errors and time).
- dedup reducer r (`dedup/p<p>.npz` for partitions p = r mod R): reads partition p from every worker; exact
  duplicates, and near-duplicate candidate pairs confirmed on the full signatures (clean.py).
- cluster (`cluster/`): union-find over all confirmed pairs; each cluster and each hash keeps its lowest document
  id; the dropped ids, ordered by pack group. Fails here, before packing, when too many records were malformed.
- packer i (groups g = i mod N): reads group g's documents and tokens from every worker, leaves out the dropped
  ones, orders the rest (sources mixed by weight, seeded by group) and packs them into shards published straight
  into `<output>/pretrain/` (`shard_g<g>_<k>.bin`); `pack/g<g>.json` says what it wrote.
- merge: the pretraining manifest over all groups' shards (with their checksums), SFT, preference and prompt
  datasets (small: one process), and the report with every worker's counts, throughput and skew.

Same result for every N: document ids, partitions and groups depend only on the input, decisions only on ids (the
lowest id wins, as when one process reads in order), and every group is packed alone in a seeded order. So
`data.parallelism` is not part of the data hash (runs.DATA_VOLATILE). Memory: a worker holds its share's index
(~30 bytes a document), a reducer one partition, a packer one group; everything else streams through files.
Every step can be rerun: a finished piece of work is found (its marker or its atomic result file) and kept.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import multiprocessing as mp
import os
import posixpath
import shutil
import statistics
import tempfile
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import from_dict, to_dict
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.data.shards import FORMAT, ShardWriter
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.data_prep import pack
from kubellama.components.data_prep.clean import EXACT, NEAR, components, exact_duplicates, candidate_pairs, group_of, \
    part_of, similar, uniq
from kubellama.components.data_prep.parallel import WorkerPool, worker_count
from kubellama.components.data_prep.plan import doc_ids, file_of, make_plan, make_tokenizer
from kubellama.components.core.data.readers import ErrorLog, read_positioned
from kubellama.components.data_prep.work import prepare_batch
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

WORK = "_work"
# A kept document in a worker's index: its id, where its tokens are, its text size and its source.
DOC = np.dtype([("doc", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("bytes", "<u4"), ("source", "<u2")])
DROP = np.dtype([("doc", "<u8"), ("reason", "u1")])
REASONS = {1: "dup_exact", 2: "dup_near"}
QUALITY = ("too_short", "too_long", "low_alpha", "repetitive")
PII_KINDS = ("email", "phone", "ip", "card")
STRAGGLER = 1.5  # a worker slower than this times the median is flagged


# --- storage helpers -------------------------------------------------------------------------------------------

def _read_plan(work: str) -> dict:
    path = storage.join(work, "plan.json")
    if not storage.exists(path):
        raise KubellamaError(f"{path} is missing: the data prep plan step has not run for this output")
    return storage.read_json(path)


def _check_plan(plan: dict, expected: str) -> None:
    if expected and plan["id"] != expected:
        raise KubellamaError(f"the data prep plan changed while this pipeline ran (plan {plan['id']}, this step was "
                             f"started for {expected}): another run with this data config is writing the same output")


_CLIENTS: dict[str, Any] = {}


def _filesystem(url: str) -> tuple[Any, str]:
    """storage.filesystem, with one S3 client per bucket and process: reducers and packers make a ranged read per
    worker and partition or group, and a new client each time costs more than the read."""
    if not storage.is_remote(url):
        return storage.filesystem(url)
    bucket = url.split("/", 3)[2]
    key = url.split("://", 1)[0] + "://" + bucket
    if key not in _CLIENTS:
        _CLIENTS[key] = storage.filesystem(url)[0]
    fs = _CLIENTS[key]
    return fs, fs._strip_protocol(url)


def _publish(local: str, url: str) -> None:
    """Move a finished local file to `url` (a rename when local; one upload on S3)."""
    if storage.is_remote(url):
        fs, path = _filesystem(url)
        fs.put_file(local, path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    shutil.move(local, url)


def _read_range(url: str, dtype: Any, start: int, stop: int) -> np.ndarray:
    """Records [start, stop) of a file of fixed-size records (one ranged read)."""
    dtype = np.dtype(dtype)
    if stop <= start:
        return np.zeros(0, dtype=dtype)
    fs, path = _filesystem(url)
    return np.frombuffer(fs.cat_file(path, start=start * dtype.itemsize, end=stop * dtype.itemsize), dtype=dtype)


def _read_rows(url: str, rows: np.ndarray, width: int) -> np.ndarray:
    """uint32 rows (sorted row numbers) of a file of rows of `width` uint32s: one read per run of consecutive rows
    (local reads, not a memory map: mapped pages would count as the process's memory)."""
    if not len(rows):
        return np.zeros((0, width), dtype=np.uint32)
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    spans = [(int(r[0]) * width * 4, (int(r[-1]) + 1) * width * 4) for r in np.split(rows, cut)]
    if storage.is_remote(url):
        fs, path = _filesystem(url)
        data = fs.cat_ranges([path] * len(spans), [a for a, _ in spans], [b for _, b in spans])
    else:
        fd = os.open(url, os.O_RDONLY)
        try:
            data = [os.pread(fd, b - a, a) for a, b in spans]
        finally:
            os.close(fd)
    return np.frombuffer(b"".join(data), dtype=np.uint32).reshape(-1, width)


def _copy_range(url: str, start: int, stop: int, out: Any, block: int = 1 << 20) -> None:
    """Bytes [start, stop) of `url` appended to the open file `out`, a block at a time."""
    if stop <= start:
        return
    fs, path = _filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            data = f.read(min(block, left))
            if not data:
                raise KubellamaError(f"{url} is shorter than its layout says ({stop} bytes)")
            out.write(data)
            left -= len(data)


def _blocks(path: str, dtype: np.dtype, count: int) -> Any:
    """A file of records, `count` records at a time (plain reads: memory is one block)."""
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, dtype=dtype, count=count)
            if not len(block):
                return
            yield block


def _save_npz(url: str, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(url, buf.getvalue())


def _load_npz(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(url))) as z:
        return {k: z[k] for k in z.files}


def _chunks(lengths: np.ndarray, budget: int = 1 << 20) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive documents of about `budget` tokens each (at least one document): what a
    step holds of a token stream at a time."""
    if not len(lengths):
        return []
    ends = np.cumsum(lengths, dtype=np.int64)
    cuts = np.unique(np.searchsorted(ends, np.arange(budget, int(ends[-1]), budget), side="right"))
    bounds = [0, *[int(c) for c in cuts if 0 < c < len(lengths)], len(lengths)]
    return list(zip(bounds[:-1], bounds[1:]))


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


# --- plan ------------------------------------------------------------------------------------------------------

def reusable(cfg: Config) -> bool:
    """True when data.output is this config's content-addressed folder (named by its data hash, wherever the run
    root is) and already holds the finished output."""
    out = cfg.data.output
    addressed = posixpath.basename(out.replace("\\", "/").rstrip("/")) == runs.data_hash(cfg)
    return addressed and storage.is_complete(out) and storage.exists(storage.join(out, "report.json"))


def plan_step(cfg: Config, work: str, workers: int) -> dict:
    """Make the plan and the tokenizer. A rerun with the same plan keeps what its steps finished; another plan
    starts over (the work folder, the output's pretraining shards and its marker go)."""
    started = time.time()
    d = cfg.data
    out = d.output
    plan = make_plan(cfg)
    plan_url = storage.join(work, "plan.json")
    if storage.exists(plan_url):
        old = storage.read_json(plan_url)
        if old.get("id") == plan["id"] and storage.exists(storage.join(out, "tokenizer.model")):
            log.info("data prep: plan %s already made; finished steps are kept", plan["id"])
            return old
    storage.remove(storage.join(out, storage.COMPLETE))
    storage.remove(work, recursive=True)
    storage.remove(storage.join(out, "pretrain"), recursive=True)
    storage.makedirs(out)
    storage.makedirs(work)
    model_bytes, info = make_tokenizer(cfg, plan, workers)
    storage.write_bytes(storage.join(out, "tokenizer.model"), model_bytes)
    storage.write_text(storage.join(out, "tokenizer.sha256"), f"{info['sha256']}  tokenizer.model\n")
    plan["tokenizer"] = info
    plan["started"], plan["ended"] = started, time.time()
    storage.write_json(plan_url, plan)
    log.info("data prep: plan %s: %d files, %d units over %d workers, %d dedup partitions, %d pack groups",
             plan["id"], len(plan["files"]), len(plan["units"]), plan["parallelism"], plan["partitions"],
             plan["groups"])
    return plan


# --- workers ---------------------------------------------------------------------------------------------------

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
        self.tokens = open(os.path.join(tmp, "tokens.spool"), "wb")
        self.exact = open(os.path.join(tmp, "exact.spool"), "wb")
        self.near = open(os.path.join(tmp, "near.spool"), "wb")
        self.sigs = open(os.path.join(tmp, "sigs.bin"), "wb")
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
            for i, j in _chunks(idx["length"]):
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
        with open(os.path.join(self.tmp, "layout.json"), "w") as f:
            json.dump(layout, f)
        return layout


def _new_source_stats() -> dict:
    return {"docs_in": 0, "chars_in": 0, "kept": 0, "dropped": Counter(), "tokens": 0}


def worker_step(cfg: Config, work: str, index: int, procs: int, plan_id: str = "") -> dict | None:
    """Worker `index`: its units, cleaned, hashed, signed and tokenized, into `<work>/w<index>/`."""
    d = cfg.data
    if storage.is_complete(d.output):
        return None
    plan = _read_plan(work)
    _check_plan(plan, plan_id)
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
            _publish(os.path.join(tmp, name), storage.join(prefix, name))
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


def _worker_files(work: str, plan: dict) -> list[tuple[str, dict]]:
    """(prefix, layout) of every worker, checked complete."""
    out = []
    for w in range(plan["parallelism"]):
        prefix = storage.join(work, f"w{w:04d}")
        if not storage.is_complete(prefix):
            raise KubellamaError(f"data prep worker {w} has not finished ({prefix} has no {storage.COMPLETE})")
        out.append((prefix, storage.read_json(storage.join(prefix, "layout.json"))))
    return out


# --- dedup reducers and clustering -----------------------------------------------------------------------------

def _signatures(workers: list[tuple[str, dict]], refs: np.ndarray, perm: int) -> np.ndarray:
    """Signatures (uint32[len(refs), perm]) of sorted signature references (worker << 40 | row)."""
    out = np.zeros((len(refs), perm), dtype=np.uint32)
    owner = (refs >> np.uint64(40)).astype(np.int64)
    for w in np.unique(owner):
        sel = np.flatnonzero(owner == w)
        rows = (refs[sel] & np.uint64((1 << 40) - 1)).astype(np.int64)
        out[sel] = _read_rows(storage.join(workers[w][0], "sigs.bin"), rows, perm)
    return out


def reduce_partition(workers: list[tuple[str, dict]], p: int, perm: int, threshold: float) -> dict[str, Any]:
    """Partition `p` of every worker's hashes and band keys: exact duplicates and confirmed near-duplicate pairs."""
    exact = np.concatenate([_read_range(storage.join(w, "exact.bin"), EXACT, lay["exact"][p], lay["exact"][p + 1])
                            for w, lay in workers])
    near = np.concatenate([_read_range(storage.join(w, "near.bin"), NEAR, lay["near"][p], lay["near"][p + 1])
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
    plan = _read_plan(work)
    _check_plan(plan, plan_id)
    workers = _worker_files(work, plan)
    done = []
    for p in range(index, plan["partitions"], plan["reducers"]):
        url = storage.join(work, "dedup", f"p{p:05d}.npz")
        if storage.exists(url):
            continue
        started = time.time()
        res = reduce_partition(workers, p, plan["perm"], cfg.data.clean.near_threshold)
        res["stats"].update(started=started, ended=time.time(), seconds=round(time.time() - started, 3))
        _save_npz(url, exact=res["exact"], a=res["a"], b=res["b"], stats=np.array(json.dumps(res["stats"])))
        done.append(res["stats"])
    log.info("data prep: dedup reducer %d: %d partitions", index, len(done))
    return done


def _worker_stats(work: str, plan: dict) -> list[dict]:
    return [storage.read_json(storage.join(work, f"w{w:04d}", "stats.json")) for w in range(plan["parallelism"])]


def input_errors(stats: list[dict], max_samples: int) -> ErrorLog:
    """The workers' input errors in one log, samples in input order (by unit, whichever worker read it)."""
    errors = ErrorLog(max_samples)
    for unit in sorted((u for s in stats for u in s["errors"]), key=lambda u: u["unit"]):
        errors.add(unit)
    return errors


def cluster_step(cfg: Config, work: str, plan_id: str = "") -> dict | None:
    """Join the reducers' pairs into clusters; write the dropped ids by pack group into `<work>/cluster/`."""
    d = cfg.data
    if storage.is_complete(d.output):
        return None
    plan = _read_plan(work)
    _check_plan(plan, plan_id)
    folder = storage.join(work, "cluster")
    if storage.is_complete(folder):
        return storage.read_json(storage.join(folder, "stats.json"))
    started = time.time()
    stats = _worker_stats(work, plan)
    input_errors(stats, d.error_samples).check(d.max_error_rate)  # before any packing
    parts = []
    for p in range(plan["partitions"]):
        url = storage.join(work, "dedup", f"p{p:05d}.npz")
        if not storage.exists(url):
            raise KubellamaError(f"dedup partition {p} has not been reduced ({url} is missing)")
        parts.append(_load_npz(url))
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
           "clusters": int(len(uniq(roots))), "pairs": int(len(a)),
           "partitions": reduced, "started": started, "ended": time.time()}
    storage.write_json(storage.join(folder, "stats.json"), out)
    storage.mark_complete(folder)
    log.info("data prep: dedup: %d exact and %d near duplicates (%d pairs in %d clusters)", len(exact), len(near),
             len(a), out["clusters"])
    return out


# --- packers ---------------------------------------------------------------------------------------------------

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
            docs = _read_range(storage.join(prefix, "docs.bin"), DOC, lay["docs"][g], lay["docs"][g + 1]).copy()
            t0, t1 = lay["tokens"][g], lay["tokens"][g + 1]
            _copy_range(storage.join(prefix, "tokens.bin"), t0 * dtype.itemsize, t1 * dtype.itemsize, f)
            docs["offset"] = docs["offset"] - np.uint64(t0) + np.uint64(base)
            base += t1 - t0
            parts.append(docs)
    docs = np.concatenate(parts)
    docs = docs[np.argsort(docs["doc"], kind="stable")]
    dropped = _read_range(storage.join(work, "cluster", "drops.bin"), DROP, drops_at[g], drops_at[g + 1])
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
        for i, j in _chunks(mixed["length"]):
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
        _publish(os.path.join(shard_dir, s["name"] + ".bin"), storage.join(d.output, "pretrain", name + ".bin"))
        shards.append({**s, "name": name})
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.remove(tokens_path)
    per_source = {str(s): {"docs": int((mixed["source"] == s).sum()),
                           "tokens": int(mixed["length"][mixed["source"] == s].sum())} for s in range(len(weights))}
    result = {"group": g, "shards": shards, "rows": manifest["rows"], "documents": int(len(order)),
              "tokens": int(mixed["length"].sum()), "bytes": int(mixed["bytes"].sum()), "dropped_tail": int(tail),
              "sources": per_source, "started": started, "ended": time.time()}
    _save_npz(storage.join(work, "pack", f"g{g:05d}.npz"), hist=hist)
    storage.write_json(storage.join(work, "pack", f"g{g:05d}.json"), result)  # last: the group is done
    return result


def pack_step(cfg: Config, work: str, index: int, plan_id: str = "") -> list[dict]:
    """Packer `index`: the groups g with g mod N == index."""
    if storage.is_complete(cfg.data.output):
        return []
    plan = _read_plan(work)
    _check_plan(plan, plan_id)
    cluster = storage.join(work, "cluster")
    if not storage.is_complete(cluster):
        raise KubellamaError(f"data prep dedup clustering has not finished ({cluster} has no {storage.COMPLETE})")
    drops_at = storage.read_json(storage.join(cluster, "stats.json"))["groups"]
    workers = _worker_files(work, plan)
    done = []
    with tempfile.TemporaryDirectory(prefix=f"kubellama-data-p{index}-") as tmp:
        for g in range(index, plan["groups"], plan["parallelism"]):
            if storage.exists(storage.join(work, "pack", f"g{g:05d}.json")):
                continue
            done.append(pack_group(cfg, work, plan, workers, drops_at, g, tmp))
            log.info("data prep: packer %d: group %d: %d documents, %d rows", index, g, done[-1]["documents"],
                     done[-1]["rows"])
    return done


# --- merge -----------------------------------------------------------------------------------------------------

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
    hist = sum((_load_npz(storage.join(work, "pack", f"g{g['group']:05d}.npz"))["hist"] for g in groups),
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
    from kubellama.components.data_prep import report as reporting
    from kubellama.components.data_prep.stage import build_datasets, summary

    d = cfg.data
    out = d.output
    if storage.is_complete(out) and storage.exists(storage.join(out, "report.json")):
        return summary(storage.read_json(storage.join(out, "report.json")))
    started = time.time()
    plan = _read_plan(work)
    _check_plan(plan, plan_id)
    stats = _worker_stats(work, plan)
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
    rep.update(build_datasets(cfg, tok, errors))
    rep["errors"] = errors.summary()
    errors.check(d.max_error_rate)
    rep["fanout"] = _fanout(plan, stats, cluster, groups, started)
    rep["seconds"] = rep["fanout"]["timing"]["total"]
    manifest = storage.join(out, "pretrain", "manifest.json")
    # The same lineage fields as a training stage's: what config made this, and the identity of the shards it wrote.
    rep["lineage"] = {"config_hash": runs.data_hash(cfg), "parent": None,
                      "data_hash": runs.manifest_hash(storage.read_json(manifest)) if storage.exists(manifest) else None}
    reporting.write(rep)
    storage.mark_complete(out, {"tokenizer_sha256": plan["tokenizer"]["sha256"]})
    log.info("data prep done in %.1fs: %s", rep["seconds"], out)
    return summary(rep)


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


# --- cleanup ---------------------------------------------------------------------------------------------------

def cleanup_step(cfg: Config, work: str, index: int) -> None:
    """Remove worker `index`'s intermediate files (0: the shared ones too) once the output is complete."""
    if not storage.is_complete(cfg.data.output):
        return
    storage.remove(storage.join(work, f"w{index:04d}"), recursive=True)
    if index == 0:
        for name in ("dedup", "cluster", "pack"):
            storage.remove(storage.join(work, name), recursive=True)
        storage.remove(storage.join(work, "plan.json"))
    if not storage.is_remote(work):
        try:
            os.rmdir(work)
        except OSError:
            pass  # another worker's files are still there, or it is gone already


# --- one machine -----------------------------------------------------------------------------------------------

def _call(step: str, config: dict, *args: Any) -> Any:
    """A step in another process (the config travels as a plain dict)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return globals()[step](from_dict(config), *args)


def _ready() -> None:
    """Nothing: submitted once per process so the processes start while the plan is made."""


def _processes(count: int) -> concurrent.futures.ProcessPoolExecutor:
    """`count` processes forked from a server that imported the steps once: a fresh interpreter per process would
    import them `count` times over, and a fork of this process could inherit S3 client threads."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return concurrent.futures.ProcessPoolExecutor(count, mp_context=ctx)


def run_local(cfg: Config, processes: bool = False) -> dict:
    """Every step on this machine, in a local work folder: tasks one after another in this process, or (with
    `processes`) each phase's tasks in parallel processes, as many at a time as there are CPUs (more would only
    take turns on them), the CPUs shared among them."""
    d = cfg.data
    n = max(1, int(d.parallelism))
    cpus = worker_count(d.workers)
    at_once = min(max(n, int(d.reducers) or n), cpus)
    pool = _processes(at_once) if processes and n > 1 and at_once > 1 else None
    with tempfile.TemporaryDirectory(prefix="kubellama-data-") as work, contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)
            for _ in range(at_once):
                pool.submit(_ready)
        plan = plan_step(cfg, work, cpus)
        procs = max(1, cpus // at_once) if pool is not None else cpus
        phases: list[tuple[str, int, Callable[[int], tuple]]] = [
            ("worker_step", n, lambda i: (work, i, procs)),
            ("dedup_step", plan["reducers"], lambda i: (work, i)),
            ("cluster_step", 1, lambda i: (work,)),
            ("pack_step", n, lambda i: (work, i)),
        ]
        for step, tasks, args in phases:
            if pool is not None:
                config = to_dict(cfg)
                for f in [pool.submit(_call, step, config, *args(i)) for i in range(tasks)]:
                    f.result()
            else:
                for i in range(tasks):
                    globals()[step](cfg, *args(i))
        return merge_step(cfg, work)


def shared_work(cfg: Config) -> str:
    """The work folder of pods that share nothing but storage."""
    return storage.join(cfg.data.output, WORK)
