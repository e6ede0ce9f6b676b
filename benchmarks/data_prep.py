"""Data prep benchmark: tokenize-and-pack throughput against SentencePiece's own multi-threaded batch encoding, and
memory as the corpus grows.

1. Throughput: the stage's tokenize-and-pack path (worker processes, order-preserving, packed into shards) against
   SentencePiece's C++ batch encoder on the same cores (`sp.encode(texts, num_threads=os.cpu_count())`, the
   texts in large batches), both timed in this run, alternating, median of --repeats each. Ours does more (BOS/EOS,
   packing, shard files, a token histogram) on the same tokenizer, so the tokenizer alone is the limit.
   The pool is started before timing, as in the stage (it starts once, before the cleaning pass); its start-up
   time is printed. Target: >= 0.9x the baseline's throughput.
2. Memory: the whole stage (clean, dedup, tokenizer training on a fixed-size sample, tokenize, pack) on a generated
   10 MB and 100 MB corpus, each in its own process; peak RSS of the stage process and of its largest worker.
   Target: the 100 MB peak within 20% of the 10 MB one.

The last line is the throughput ratio. Other processes on the machine slow both sides; the load average is printed.

Usage: python benchmarks/data_prep.py [--mb 30] [--sizes 10,100] [--vocab 8000] [--repeats 3]
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

    from components.core.shards import ShardWriter
    from components.data_prep.pack import batched, tokenize_and_pack, train_tokenizer
    from components.data_prep.parallel import WorkerPool

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
    from components.core.config import load_config
    from components.data_prep.stage import run

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=30, help="corpus size for the throughput comparison")
    p.add_argument("--sizes", default="10,100", help="corpus sizes (MB) for the memory comparison (empty: skip it)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs of each side (the median counts)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kubellama-bench"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_memory(*args.child)
        return
    os.makedirs(args.cache, exist_ok=True)
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
