"""Data prep benchmark: tokenize-and-pack throughput against SentencePiece's own multi-threaded batch encoding, and
memory as the corpus grows.

1. Throughput: the stage's tokenize-and-pack path against `sp.encode(texts, num_threads=...)` on the same cores,
   alternating, median of --repeats each; target >= 0.9x the baseline.
2. Memory: the whole stage on generated 10 and 100 MB corpora, each in its own process (peak RSS of it and of its
   largest worker); target: within 1.2x.
3. `--parallelism N` (instead): the whole stage with N workers as local processes against one, same cores, same
   output; target: N's throughput >= 0.8x one worker's. The last line is the ratio.

Usage: python benchmarks/data_prep.py [--mb 30] [--sizes 10,100] [--vocab 8000] [--repeats 3] [--parallelism N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Project modules are imported inside the functions that use them: the stage's spawned worker processes re-import
# this script as their main module, and the stage's imports at its top would count in the worker memory measured.

# Texts per baseline call: large, so SentencePiece's threads stay busy and its per-call set-up is amortised.
BASELINE_BATCH_CHARS = 1 << 23


def corpus(path: str, mb: int, seed: int = 0) -> str:
    """A JSONL corpus of about `mb` MB: Zipf-distributed made-up words, numbers and punctuation, 1-8 kB documents."""
    if os.path.exists(path) and os.path.getsize(path) >= mb * 1_000_000 * 0.95:
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = np.array(["".join(rng.choice(letters, size=rng.integers(1, 10), p=None)) for _ in range(20000)])
    ranks = np.arange(1, len(vocab) + 1)
    p = (1 / ranks) / (1 / ranks).sum()
    written = 0
    with open(path + ".tmp", "w") as f:
        while written < mb * 1_000_000:
            words = vocab[rng.choice(len(vocab), size=int(rng.integers(150, 1300)), p=p)]
            sentences = [" ".join(s).capitalize() + rng.choice([".", "!", "?", f" {rng.integers(0, 10**5)}."])
                         for s in np.array_split(words, max(1, len(words) // 12))]
            line = json.dumps({"text": " ".join(sentences)}) + "\n"
            f.write(line)
            written += len(line)
    os.replace(path + ".tmp", path)
    return path


def read_docs(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def throughput(path: str, vocab: int, workers: int, repeats: int) -> dict:
    import sentencepiece as spm

    from kubellama.components.core.data.shards import ShardWriter
    from kubellama.components.data_prep.pack import batched, tokenize_and_pack, train_tokenizer
    from kubellama.components.data_prep.parallel import WorkerPool

    docs = read_docs(path)
    nbytes = sum(len(d.encode()) for d in docs)
    model = train_tokenizer(docs[:200], vocab_size=vocab, threads=workers, seed_chars=2_000_000)
    sp = spm.SentencePieceProcessor(model_proto=model)

    def cpu() -> float:
        """CPU seconds of this process and its finished children (the pool's workers once it is closed)."""
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def baseline() -> tuple[float, int]:
        t0 = time.perf_counter()
        n = sum(len(x) + 2 for batch in batched(docs, BASELINE_BATCH_CHARS)  # + BOS, EOS
                for x in sp.encode(batch, num_threads=workers))
        return time.perf_counter() - t0, n

    def ours() -> tuple[float, float, dict]:
        """(tokenize-and-pack seconds on a started pool, pool start-up seconds, result).

        The stage starts its pool once, before the cleaning pass, so tokenizing runs on warm workers; the
        start-up is timed on its own and reported beside the ratio.
        """
        with tempfile.TemporaryDirectory() as tmp:
            model_path = os.path.join(tmp, "tokenizer.model")
            with open(model_path, "wb") as f:
                f.write(model)
            t0 = time.perf_counter()
            with WorkerPool(workers) as pool:
                list(pool.map(abs, range(4 * workers)))  # every worker up and answering
                started = time.perf_counter() - t0
                t0 = time.perf_counter()
                writer = ShardWriter(os.path.join(tmp, "shards"), 2048, vocab)
                res = tokenize_and_pack((("c", d) for d in docs), model_path, writer, 2048, pool, vocab)
                writer.close()
                return time.perf_counter() - t0, started, res

    # Alternate the two: other load on the machine hits both alike; the medians count.
    runs, cpus = [], []
    for _ in range(repeats):
        c0 = cpu()
        b = baseline()
        c1 = cpu()
        o = ours()
        cpus.append((c1 - c0, cpu() - c1))
        runs.append((b, o))
    base = statistics.median(r[0][0] for r in runs)
    base_tokens = runs[0][0][1]
    ours_s = statistics.median(r[1][0] for r in runs)
    start_s = statistics.median(r[1][1] for r in runs)
    res = runs[0][1][2]
    assert res["tokens"] == base_tokens, (res["tokens"], base_tokens)
    return {"mb": round(nbytes / 1e6, 1), "tokens": base_tokens, "baseline_s": round(base, 2),
            "ours_s": round(ours_s, 2), "baseline_mb_s": round(nbytes / 1e6 / base, 2),
            "ours_mb_s": round(nbytes / 1e6 / ours_s, 2), "ratio": base / ours_s,
            "start_s": round(start_s, 2), "each": [(round(b[0], 2), round(o[0], 2)) for b, o in runs],
            "baseline_cpu_s": round(statistics.median(c[0] for c in cpus), 2),
            "ours_cpu_s": round(statistics.median(c[1] for c in cpus), 2)}


def child_memory(path: str, out: str) -> None:
    """Run the stage on `path` in this process and print peak RSS (MB) of it and of its largest worker."""
    from kubellama.components.core.recipe.config import load_config
    from kubellama.components.data_prep.stage import run

    cfg = load_config([f"data.output={out}", f"data.sources=[{{name:gen,path:'{path}'}}]",
                       "data.tokenizer.vocab_size=2048", "data.tokenizer.train_chars=5000000"])
    t0 = time.perf_counter()
    summary = run(cfg)
    print(json.dumps({"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "seconds": round(time.perf_counter() - t0, 1), "tokens": summary["pretrain_tokens"]}))


def memory(path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, os.path.join(tmp, "out")],
                             capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"stage run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fanout(n: int, repeats: int, generated: str | None, vocab: int) -> None:
    """Mode 3: N workers as processes against one, same cores, same output (checked)."""
    from kubellama.components.core.recipe.config import load_config
    from kubellama.components.data_prep import samples
    from kubellama.components.data_prep.pack import train_tokenizer
    from kubellama.components.data_prep.stage import run

    if generated:
        srcs, paths = f"data.sources=[{{name:gen,path:'{generated}'}}]", [generated]
    else:
        srcs = samples.demo_overrides()[0]  # the pretraining sources: Wikipedia and C4 samples
        paths = [os.path.join(samples.DEFAULT_DEST, "llamafactory", f) for f in ("wiki_demo.txt", "c4_demo.jsonl")]
        if not all(os.path.exists(f) for f in paths):
            raise SystemExit("sample data missing: run `kubellama data fetch-samples` first")
    mb = sum(os.path.getsize(f) for f in paths) / 1e6
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "tokenizer.model")
        with open(model, "wb") as f:
            texts = [line for path in paths for line in open(path, encoding="utf-8")][:2000]  # noqa: SIM115
            f.write(train_tokenizer(texts, vocab_size=vocab, seed_chars=2_000_000))
        base = [srcs, f"data.tokenizer.model={model}", f"model.vocab_size={vocab}",
                f"data.split_bytes={max(1, int(mb * 1e6 / (2 * n)))}", "data.seq_len=256"]
        best: dict[int, dict] = {}
        for r in range(repeats):
            for k in (1, n):
                out = os.path.join(tmp, f"out{k}-{r}")
                t0 = time.perf_counter()
                run(load_config([*base, f"data.output={out}", f"data.parallelism={k}"]), processes=k > 1)
                seconds = time.perf_counter() - t0
                with open(os.path.join(out, "report.json")) as f:
                    rep = json.load(f)
                if k not in best or seconds < best[k]["seconds"]:
                    best[k] = {"seconds": seconds, "timing": rep["fanout"]["timing"],
                               "tokens": rep["pretrain"]["tokens"], "shards": [s["sha256"] for s in rep_manifest(out)]}
    assert best[1]["shards"] == best[n]["shards"], "N workers wrote other shards than one"
    print(f"data prep, {mb:.1f} MB ({'generated' if generated else 'samples: wiki, c4'}), {os.cpu_count()} cores, "
          f"best of {repeats}, load average before: {load:.2f}:")
    for k in (1, n):
        b = best[k]
        t = b["timing"]
        print(f"  N={k}{' (processes)' if k > 1 else ''}: {b['seconds']:.2f} s  {mb / b['seconds']:.3f} MB/s  "
              f"{b['tokens']:,} tokens  (plan {t['plan']}, workers {t['workers']}, dedup {t['dedup']}, pack "
              f"{t['pack']}, merge {t['merge']} s)")
    t = best[n]["timing"]
    print(f"  merge step: {t['merge_share']:.1%} of N={n}'s total; dedup + merge: "
          f"{(t['dedup'] + t['merge']) / max(t['total'], 1e-9):.1%} (other load on the machine lowers the ratio)")
    print(f"ratio {best[1]['seconds'] / best[n]['seconds']:.2f} (target >= 0.8)")


def rep_manifest(out: str) -> list[dict]:
    with open(os.path.join(out, "pretrain", "manifest.json")) as f:
        return json.load(f)["shards"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=30, help="corpus size for the throughput comparison")
    p.add_argument("--sizes", default="10,100", help="corpus sizes (MB) for the memory comparison (empty: skip it)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs of each side (the median counts)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kubellama-bench"))
    p.add_argument("--parallelism", type=int, default=0, help="mode 3: N workers against 1 (data prep fan-out)")
    p.add_argument("--generated", action="store_true", help="mode 3 on a generated corpus of --mb MB")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_memory(*args.child)
        return
    os.makedirs(args.cache, exist_ok=True)
    if args.parallelism:
        gen = corpus(os.path.join(args.cache, f"corpus_{args.mb}mb.jsonl"), args.mb) if args.generated else None
        fanout(args.parallelism, args.repeats, gen, args.vocab)
        return
    workers = os.cpu_count() or 1
    load = os.getloadavg()[0]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        mem = {s: memory(corpus(os.path.join(args.cache, f"corpus_{s}mb.jsonl"), s)) for s in sizes}
        print("peak memory of the whole stage (RSS, MB):")
        for s, m in mem.items():
            print(f"  {s:>4} MB corpus: stage process {m['main_mb']:.0f}, largest worker {m['worker_mb']:.0f}, "
                  f"{m['seconds']} s, {m['tokens']:,} tokens")
        lo, hi = mem[sizes[0]], mem[sizes[-1]]
        for key in ("main_mb", "worker_mb"):
            print(f"  {key.replace('_mb', '')}: {hi[key] / lo[key]:.2f}x from {sizes[0]} to {sizes[-1]} MB "
                  f"(target within 1.20x)")
    t = throughput(corpus(os.path.join(args.cache, f"corpus_{args.mb}mb.jsonl"), args.mb), args.vocab, workers,
                   args.repeats)
    print(f"tokenize+pack, {t['mb']} MB, {t['tokens']:,} tokens, {workers} cores, median of {args.repeats} "
          f"(baseline s, ours s: {t['each']}), load average before: {load:.2f}:")
    print(f"  baseline (sentencepiece batch encode, {workers} threads): {t['baseline_s']:.2f} s  "
          f"{t['baseline_mb_s']} MB/s")
    print(f"  ours (data prep tokenize_and_pack, {workers} workers):      {t['ours_s']:.2f} s  {t['ours_mb_s']} MB/s"
          f"  (+ pool start-up {t['start_s']} s, once per stage)")
    print(f"  CPU seconds (all processes): baseline {t['baseline_cpu_s']}, ours {t['ours_cpu_s']}")
    print(f"ratio {t['ratio']:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
