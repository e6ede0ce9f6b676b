"""Data prep beyond one machine: global dedup recall, the same output for 1 and 4 workers, the fan-out pipeline."""
from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_data_prep import doc, overrides, sources, write_jsonl

from kubellama.components.core.data.readers import ErrorLog, read_positioned
from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import fanout, stage, steps
from kubellama.components.data_prep.clean import NEAR, band_keys, components, uniq
from kubellama.components.data_prep.parallel import worker_count
from kubellama.pipelines import run as pipeline_run

PERM, BANDS = 128, 16


# --- near-dedup recall ------------------------------------------------------------------------------------------

def _mutate(rng: np.random.Generator, sig: np.ndarray, positions: np.ndarray) -> np.ndarray:
    out = sig.copy()
    out[positions] = rng.integers(0, 2**32, size=len(positions), dtype=np.uint64).astype(np.uint32)
    return out


def _synthetic_workers(tmp, docs: np.ndarray, sigs: np.ndarray, parts: int, workers: int = 2) -> list:
    """Worker folders as data prep's workers write them (band keys by partition, signatures by row), for
    synthetic signatures: every other document to each worker."""
    out = []
    for w in range(workers):
        sel = np.arange(w, len(docs), workers)
        keys = band_keys(sigs[sel], BANDS)
        near = np.zeros(keys.shape, dtype=NEAR)
        near["key"], near["doc"] = keys, docs[sel][:, None]
        near["ref"] = ((np.uint64(w) << np.uint64(40)) | np.arange(len(sel), dtype=np.uint64))[:, None]
        near["band"] = np.arange(BANDS)[None, :]
        folder = tmp / f"w{w}"
        folder.mkdir()
        near.ravel().tofile(str(folder / "near.spool"))
        sigs[sel].tofile(str(folder / "sigs.bin"))
        (folder / "exact.bin").write_bytes(b"")
        layout = {"near": steps.partition_file(str(folder / "near.spool"), NEAR, "key", parts,
                                               str(folder / "near.bin")), "exact": [0] * (parts + 1)}
        out.append((str(folder), layout))
    return out


def test_near_dedup_recall_where_32_bit_keys_collide(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    base = rng.integers(0, 2**32, size=(n, PERM), dtype=np.uint64).astype(np.uint32)
    keys = band_keys(base, BANDS)
    # The size matters: in one 32-bit table these unrelated documents' band keys collide hundreds of times (each
    # collision could hide a duplicate behind an unrelated first-in-bucket); as 64-bit keys per band, never.
    k32 = keys & np.uint64(0xFFFFFFFF)
    assert k32.size - uniq(k32).size > 100
    assert uniq(keys).size == keys.size

    planted, dups, keep = [], [], []
    nxt = n
    positions = np.arange(PERM)
    for a in rng.choice(np.arange(n // 2, n), size=2600, replace=False).tolist():
        kind = len(planted)
        if kind < 2000:  # one near duplicate: 10 rows of 128 differ (estimated Jaccard 0.92)
            planted.append(_mutate(rng, base[a], rng.choice(positions, 10, replace=False)))
            dups.append(nxt)
            nxt += 1
        elif kind < 2200:  # a chain: b ~ a, c ~ b (c ~ a only at 0.81)
            b = _mutate(rng, base[a], positions[:12] + 64)
            planted += [b, _mutate(rng, b, positions[:12])]
            dups += [nxt, nxt + 1]
            nxt += 2
        elif kind < 2400:
            # A crowded bucket: an unrelated document with a lower id holds the one band a and its duplicate share
            # (every other band differs in one row, Jaccard 0.88); every document stays in its bucket, so the pair
            # is still found.
            x = int(rng.integers(0, n // 2))
            base[x, :8] = base[a, :8]
            planted.append(_mutate(rng, base[a], np.arange(1, BANDS) * 8 + 3))
            dups.append(nxt)
            keep.append(x)
            nxt += 1
        else:  # similar but below the threshold (Jaccard 0.69): a candidate at most, never dropped
            planted.append(_mutate(rng, base[a], rng.choice(positions, 40, replace=False)))
            keep.append(nxt)
            nxt += 1
    docs = np.arange(nxt, dtype=np.uint64)
    sigs = np.concatenate([base, np.stack(planted)])
    workers = _synthetic_workers(tmp_path, docs, sigs, parts=8)
    a, b, sizes = [], [], []
    for p in range(8):
        res = steps.reduce_partition(workers, p, PERM, 0.8)
        a.append(res["a"])
        b.append(res["b"])
        sizes.append(res["stats"]["bytes"])
    nodes, roots = components(np.concatenate(a), np.concatenate(b))
    dropped = set(nodes[roots != nodes].tolist())
    assert dropped == set(dups)  # recall 1.0, and nothing else dropped
    assert not dropped & set(keep)
    # Memory per reducer: one partition of the keys, not the corpus.
    assert max(sizes) < 1.3 * sum(sizes) / 8


def test_union_find_names_clusters_by_lowest_id() -> None:
    nodes, roots = components(np.array([9, 4, 7, 20], dtype=np.uint64), np.array([4, 7, 12, 21], dtype=np.uint64))
    assert dict(zip(nodes.tolist(), roots.tolist())) == {4: 4, 7: 4, 9: 4, 12: 4, 20: 20, 21: 20}


# --- the same output for 1 and 4 workers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources over JSONL, gzipped JSONL, text and Parquet (row groups), with near duplicates planted across
    files; the stage run with 1 worker in this process and with 4 as processes."""
    tmp = tmp_path_factory.mktemp("fanout")
    rng = random.Random(11)
    web = [doc(rng, rng.randint(40, 120)) + f" origweb{i}" for i in range(90)]
    wiki = [doc(rng, rng.randint(40, 120)) + f" origwiki{i}" for i in range(60)]
    (tmp / "web").mkdir()
    (tmp / "wiki").mkdir()
    lines = [json.dumps({"text": t}) for t in web[:60]]
    lines.insert(17, "{broken json")
    (tmp / "web" / "a.jsonl").write_text("\n".join(lines) + "\n")
    # Cross-file near duplicates: in the gzipped file, web documents 3 and 40 with their marker word replaced.
    near = [web[3].replace("origweb3", "dupweb3"), web[40].replace("origweb40", "dupweb40")]
    with gzip.open(tmp / "web" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in web[60:] + near) + "\n")
    # In the text file: an exact copy of web document 5; in Parquet (row groups of 7): wiki document 2 upper-cased.
    (tmp / "wiki" / "a.txt").write_text("\n".join(wiki[:30] + [web[5]]) + "\n")
    pq.write_table(pa.table({"text": wiki[30:] + [wiki[2].upper()]}), str(tmp / "wiki" / "b.parquet"),
                   row_group_size=7)
    srcs = sources(("web", str(tmp / "web"), {}), ("wiki", str(tmp / "wiki"), {"weight": 2.5}))
    base = {"data.max_error_rate": 0.05, "data.sources": srcs, "data.split_bytes": 6000,
            "data.partition_bytes": 20000, "data.group_bytes": 40000, "data.shard_tokens": 64 * 20}
    one, four = str(tmp / "one"), str(tmp / "four")
    cfg1 = load_config(overrides(one, **base, **{"data.parallelism": 1}))
    stage.run(cfg1)
    args4 = overrides(four, **base, **{"data.parallelism": 4})
    assert stage.main([*args4, "--workers-as-processes"]) == 0
    return {"one": one, "four": four, "cfg1": cfg1, "cfg4": load_config(args4),
            "reports": [storage.read_json(os.path.join(o, "report.json")) for o in (one, four)]}


def _rows(url: str) -> list[bytes]:
    reader = ShardReader(url)  # verifies every shard's sha256 against the manifest as it reads
    return sorted(reader.row(i)["tokens"].tobytes() for i in range(reader.total_rows))


def test_one_and_four_workers_give_the_same_manifest_and_rows(corpus) -> None:
    assert runs.data_hash(corpus["cfg1"]) == runs.data_hash(corpus["cfg4"])  # parallelism is not shaping
    one, four = (storage.read_json(os.path.join(corpus[k], "pretrain", "manifest.json")) for k in ("one", "four"))
    for key in ("rows", "tokens", "documents", "dropped_tail_tokens", "sources", "groups", "seq_len", "dtype"):
        assert one[key] == four[key], key
    assert one["groups"] > 1 and len(one["shards"]) > one["groups"]
    # Every shard of every pack group, with its checksum, identical.
    assert [(s["name"], s["rows"], s["sha256"]) for s in one["shards"]] == \
        [(s["name"], s["rows"], s["sha256"]) for s in four["shards"]]
    assert _rows(os.path.join(corpus["one"], "pretrain")) == _rows(os.path.join(corpus["four"], "pretrain"))
    rep1, rep4 = corpus["reports"]
    for key in ("sources", "errors"):
        assert rep1[key] == rep4[key], key
    for key in ("dropped", "pii"):
        assert rep1["clean"][key] == rep4["clean"][key], key
    for key in ("candidate_pairs", "confirmed_pairs"):  # the partitioning differs, not what it finds
        assert rep1["clean"]["dedup"][key] == rep4["clean"]["dedup"][key], key
    assert rep1["tokenizer"]["sha256"] == rep4["tokenizer"]["sha256"]
    drop_url = ("url",)
    assert {k: v for k, v in rep1["pretrain"].items() if k not in drop_url} == \
        {k: v for k, v in rep4["pretrain"].items() if k not in drop_url}
    # The split really was different: one worker against four, each with its share of the units.
    f1, f4 = rep1["fanout"], rep4["fanout"]
    assert (f1["parallelism"], f4["parallelism"]) == (1, 4) and f1["units"] == f4["units"] > 8
    assert [w["units"] for w in f1["workers"]["tasks"]] == [f1["units"]]
    assert len(f4["workers"]["tasks"]) == 4 and all(w["units"] > 0 for w in f4["workers"]["tasks"])
    assert sum(w["docs_in"] for w in f4["workers"]["tasks"]) == f1["workers"]["tasks"][0]["docs_in"]
    assert f4["partitions"] > 1 and "Workers" in storage.read_text(os.path.join(corpus["four"], "report.md"))
    # Nothing of the fan-out's work is left behind.
    assert not os.path.exists(os.path.join(corpus["four"], steps.WORK))


def test_cross_file_near_duplicates_are_removed_alike(corpus) -> None:
    for key in ("one", "four"):
        rep = storage.read_json(os.path.join(corpus[key], "report.json"))
        assert rep["clean"]["dropped"]["dup_near"] == 3 and rep["clean"]["dropped"]["dup_exact"] == 1
        assert rep["errors"]["by_reason"] == {"malformed JSON": 1}
        out = corpus[key]
        tok = Tokenizer(os.path.join(out, "tokenizer.model"))
        reader = ShardReader(os.path.join(out, "pretrain"))
        text = tok.decode(np.concatenate([reader.row(i)["tokens"] for i in range(reader.total_rows)]))
        assert "dupweb3" not in text and "dupweb40" not in text and "ORIGWIKI2" not in text
        for kept in ("origweb3", "origweb40", "origwiki2", "origweb60", "origweb89", "origwiki59"):
            assert kept in text
        web, wiki = rep["sources"]
        assert web["dropped"] == {"dup_near": 2} and wiki["dropped"] == {"dup_exact": 1, "dup_near": 1}
        # Parquet row groups and the text file's byte ranges were separate units, the gzipped file one.
        assert (web["docs_in"], wiki["docs_in"]) == (92, 62)


# --- the pipeline -----------------------------------------------------------------------------------------------

def _component(spec: dict, task: dict) -> dict:
    return spec["components"][task["componentRef"]["name"]]


def test_compile_fans_out_with_sized_workers_and_dedup_reducers(tmp_path, capsys) -> None:
    path = str(tmp_path / "p.yaml")
    assert pipeline_run.compile_main(["data.parallelism=8", "-o", path]) == 0
    spec, _ = yaml.safe_load_all(open(path))
    tasks = spec["root"]["dag"]["tasks"]
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert {"data-prep-plan", "data-prep-workers", "data-prep-reducers", "data-prep-cluster", "data-prep-packers",
            "data-prep-merge", "pretrain"} <= set(tasks)
    assert "data-prep-plan" in deps["data-prep-workers"] and "data-prep-workers" in deps["data-prep-reducers"]
    assert "data-prep-reducers" in deps["data-prep-cluster"] and "data-prep-cluster" in deps["data-prep-packers"]
    assert "data-prep-packers" in deps["data-prep-merge"]
    assert tasks["pretrain"]["inputs"]["artifacts"]["data"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset", "producerTask": "data-prep-merge"}
    data = load_config([]).data
    executors = spec["deploymentSpec"]["executors"]
    for group, leaf in (("data-prep-workers", "comp-data-prep-worker"), ("data-prep-reducers", "comp-data-prep-dedup"),
                        ("data-prep-packers", "comp-data-prep-pack")):
        (loop,) = _component(spec, tasks[group])["dag"]["tasks"].values()
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(8))
        assert loop["iteratorPolicy"]["parallelismLimit"] == 8
        (inner,) = _component(spec, loop)["dag"]["tasks"].values()
        assert inner["componentRef"]["name"] == leaf
        res = executors[spec["components"][leaf]["executorLabel"]]["container"]["resources"]
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == (data.cpu, data.cpu)
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == (data.memory, data.memory)
    text = run_text(["data.parallelism=8", "data.reducers=3"])
    assert text.count("ParallelFor of") == 4  # workers, reducers, packers, cleanup
    assert "ParallelFor of 8: data-prep-worker" in text and "ParallelFor of 3: data-prep-dedup" in text


def run_text(overrides: list[str]) -> str:
    return pipeline_run.dag_text(pipeline_run.resolve(overrides), overrides)


def test_kfp_local_fan_out_writes_what_one_process_writes(tmp_path, capsys) -> None:
    from test_pipeline_local import TINY, outputs
    from test_pipeline_local import corpus as make_corpus

    src = make_corpus(str(tmp_path / "corpus.jsonl"), docs=120)
    common = [f"data.sources=[{{name:t,path:'{src}'}}]", *TINY, "data.split_bytes=10000"]
    root = str(tmp_path / "run")
    assert pipeline_run.run_main(["--pipeline", "data_prep", f"run.root={root}", *common,
                                  "data.parallelism=3"]) == 0
    out = outputs(capsys.readouterr().out)["data_prep"]
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["fanout"]["parallelism"] == 3 and len(rep["fanout"]["workers"]["tasks"]) == 3
    assert not os.path.exists(os.path.join(out, steps.WORK))
    alone = str(tmp_path / "alone")
    stage.run(load_config([*common, f"data.output={alone}"]))
    shards = [storage.read_json(os.path.join(o, "pretrain", "manifest.json"))["shards"] for o in (out, alone)]
    assert shards[0] == shards[1]


# --- the parts that did not scale -------------------------------------------------------------------------------

def test_workers_follow_the_cgroup_cpu_limit(tmp_path) -> None:
    cores = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert worker_count(0, str(tmp_path)) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert worker_count(0, str(tmp_path)) == cores
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert worker_count(0, str(v1)) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert worker_count(0, str(v1)) == cores and worker_count(3, str(v1)) == 3


def test_byte_ranges_read_every_line_once(tmp_path) -> None:
    rng = random.Random(5)
    recs = [{"text": doc(rng, rng.randint(1, 30)), "i": i} for i in range(200)]
    path = write_jsonl(str(tmp_path / "x.jsonl"), recs)
    size = os.path.getsize(path)
    whole = [(r["i"], pos) for r, _, pos in read_positioned(path, ErrorLog())]
    cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(9))})
    parts = [(r["i"], pos) for a, b in itertools.pairwise(cuts) for r, _, pos in read_positioned(path, ErrorLog(), start=a,
                                                                                             end=b)]
    assert parts == whole and [i for i, _ in whole] == list(range(200))


def test_compressed_and_corrupt_inputs(tmp_path) -> None:
    rng = random.Random(6)
    texts = [doc(rng, 60) for _ in range(30)]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in texts[:20]) + "\n")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    write_jsonl(str(tmp_path / "e.jsonl"), [{"text": t} for t in texts[20:]])
    got = [r["text"] for r, _, _ in read_positioned(str(tmp_path / "c.jsonl.gz"), ErrorLog())]
    assert got == texts[:20]
    out = str(tmp_path / "out")
    stage.run(load_config(overrides(out, **{"data.max_error_rate": 0.1, "data.sources": sources(
        ("c", str(tmp_path), {}))})))
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["sources"][0]["docs_in"] == 30 and rep["errors"]["by_reason"] == {"unreadable Parquet": 1}
    assert rep["errors"]["samples"][0].startswith(f"{tmp_path / 'd.parquet'}: unreadable Parquet")
    # .zst through fsspec's inferred codec (zstandard is a dependency).
    import zstandard

    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        ("\n".join(json.dumps({"text": t}) for t in texts[:5]) + "\n").encode()))
    assert [r["text"] for r, _, _ in read_positioned(str(tmp_path / "z.jsonl.zst"), ErrorLog())] == texts[:5]


def test_tokenizer_sample_is_drawn_across_all_inputs(tmp_path) -> None:
    rng = random.Random(7)
    for k in range(4):  # 4 files of ~60 kB; a 40 kB budget
        write_jsonl(str(tmp_path / f"f{k}.jsonl"), [{"text": f"file{k}doc{i} " + doc(rng, 40)} for i in range(200)])
    cfg = load_config(overrides(str(tmp_path / "o"), **{"data.sources": sources(("s", str(tmp_path), {}))}))
    plan = fanout.make_plan(cfg)
    texts = list(fanout.sample_texts(plan, 40_000, seed=1))
    assert sum(map(len, texts)) >= 40_000
    marks = [t.split(" ", 1)[0] for t in texts]
    assert {m.split("doc")[0] for m in marks} == {f"file{k}" for k in range(4)}
    # Windows start anywhere in a file, not only at its start, and never overlap.
    assert max(int(m.split("doc")[1]) for m in marks) > 100 and len(set(marks)) == len(marks)
    assert texts == list(fanout.sample_texts(plan, 40_000, seed=1))


def test_sft_and_preference_records_are_cleaned(tmp_path) -> None:
    rng = random.Random(8)
    dialog = {"messages": [{"role": "user", "content": "Mail me at bob.smith@example.org please"},
                           {"role": "assistant", "content": "Noted, call +1 415-555-0199 instead."}]}
    sft = write_jsonl(str(tmp_path / "sft.jsonl"), [dialog, dialog, {"instruction": "Kanro?", "output": "Sana."}])
    pairs = [{"prompt": "Ip 10.1.2.3?", "chosen": "Hidden.", "rejected": "It is 10.1.2.3."}] * 2 + [
        {"prompt": "Ka?", "chosen": "Lo.", "rejected": "Mi."}]
    pref = write_jsonl(str(tmp_path / "pref.jsonl"), pairs)
    text = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": doc(rng, 80)} for _ in range(30)])
    out = str(tmp_path / "out")
    stage.run(load_config(overrides(out, **{
        "data.seq_len": 128, "data.preference.eval_fraction": 0.0, "data.sources": sources(("t", text, {})),
        "data.sft.sources": sources(("chat", sft, {})), "data.preference.sources": sources(("p", pref, {}))})))
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["sft"]["sources"] == {"chat": 2} and rep["sft"]["clean"]["dropped"] == {"dup_exact": 1}
    assert rep["sft"]["clean"]["pii"] == {"email": 1, "phone": 1, "ip": 0, "card": 0}
    assert rep["preference"]["train"] == 2 and rep["preference"]["clean"]["pii"]["ip"] == 2
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    manifests = glob.glob(os.path.join(out, "sft", "**", "manifest.json"), recursive=True)
    readers = [ShardReader(os.path.dirname(m)) for m in manifests if storage.read_json(m)["rows"]]
    sft_text = tok.decode(np.concatenate([r.row(i)["tokens"] for r in readers for i in range(r.total_rows)]))
    assert "<EMAIL>" in sft_text and "<PHONE>" in sft_text and "example.org" not in sft_text
    got = [json.loads(x) for x in open(os.path.join(out, "preference", "train.jsonl"))]
    assert got[0]["prompt"] == "Ip <IP_ADDRESS>?" and got[0]["rejected"] == "It is <IP_ADDRESS>."
    assert "SFT and preference cleaning" in storage.read_text(os.path.join(out, "report.md"))


def test_pods_share_nothing_but_s3(s3_bucket, tmp_path) -> None:
    """The fan-out's steps as separate pods would run them, with everything in between on S3 (moto)."""
    rng = random.Random(9)
    docs = [doc(rng, 60) for _ in range(40)]
    storage.write_text(f"{s3_bucket}/in/a.jsonl", "\n".join(json.dumps({"text": t}) for t in docs[:25]) + "\n")
    storage.write_text(f"{s3_bucket}/in/b.txt", "\n".join(docs[25:] + [docs[3].upper()]) + "\n")
    base = {"data.sources": sources(("s3", f"{s3_bucket}/in", {})), "data.split_bytes": 4000,
            "data.shard_tokens": 64 * 8}
    cfg = load_config(overrides(f"{s3_bucket}/out", **base, **{"data.parallelism": 2}))
    work = steps.shared_work(cfg)
    plan = steps.plan_step(cfg, work, 1)["id"]
    for i in range(2):
        steps.worker_step(cfg, work, i, 1, plan)
    assert storage.is_complete(f"{work}/w0001")
    for i in range(2):
        steps.dedup_step(cfg, work, i, plan)
    steps.cluster_step(cfg, work, plan)
    for i in range(2):
        steps.pack_step(cfg, work, i, plan)
    summary = steps.merge_step(cfg, work, plan)
    for i in range(2):
        steps.cleanup_step(cfg, work, i)
    assert summary["dropped"] == 1 and not storage.exists(f"{work}/plan.json") and not storage.exists(f"{work}/w0000")
    alone = str(tmp_path / "alone")
    stage.run(load_config(overrides(alone, **base)))
    got, want = (storage.read_json(f"{o}/pretrain/manifest.json") for o in (f"{s3_bucket}/out", alone))
    assert [(s["name"], s["sha256"]) for s in got["shards"]] == [(s["name"], s["sha256"]) for s in want["shards"]]
    assert ShardReader(f"{s3_bucket}/out/pretrain").total_rows == got["rows"] > 0


def test_report_flags_a_straggler() -> None:
    stats = [{"index": i, "seconds": s} for i, s in enumerate([10.0, 11.0, 9.5, 31.0])]
    spread = steps.spread(stats, "workers")
    assert spread["stragglers"] == [3] and spread["skew"] == round(31.0 / 15.375, 3)
    assert steps.spread(stats[:3], "workers")["stragglers"] == []
