"""Generation tokens/s of our rollout path against transformers' `generate` with a KV cache, on the same weights,
prompts and batch, at the same precision, in the same run.

Both sides sample the same way: temperature 1.0, top-p 0.9 (transformers: `do_sample=True`, `top_k=0`, its default
DynamicCache), the same left-padded prompts of varied lengths, and exactly `new` tokens per prompt (EOS off on both
sides: ours `eos_id=None`, transformers `eos_token_id=None` and `min_new_tokens=new`); only new tokens count. Both
generate from the same weights (`build_llama` at one seed, copied into LlamaForCausalLM by the export's key map) in
the compute dtype of `auto` precision (components/core/train/precision.py: bf16 on GPUs and on CPUs with AMX or
AVX512-BF16): ours from the bf16 copy PPO's rollouts generate from (`consolidated`), transformers with its model cast
to that dtype. Neither is compiled.

Each side runs in its own child process, and rounds alternate, so load from other processes hits every side alike;
tokens/s is taken from the median call over all rounds. OpenMP threads wait passively on both sides (see main).

With `--fsdp N` the comparison is our rollout path under a real N-rank FSDP2 policy (gloo on CPU, NCCL on GPUs),
against the same unsharded model generating the whole batch in one process. Each rank generates its share of the
batch (seeded per prompt, so the answers are the unsharded run's), and a timed call is what PPO's rollout does:
consolidate the sharded policy into an unsharded bf16 model, then generate. Both `ppo.rollout` modes are measured:
`gathered` (a new consolidated model per rollout, freed after) and `copy` (one kept and refreshed in place). CPU
threads are split between the ranks, so both runs use the same cores. The ratio is sharded over unsharded
throughput (the slower mode).

    python benchmarks/rollout.py                       # tiny model: target ours/transformers >= 2.0
    python benchmarks/rollout.py --preset cpu-100m     # ~134M, bf16: >= 1.3
    python benchmarks/rollout.py --fsdp 2              # 2-rank FSDP on CPU: within 1.3x of unsharded (>= 0.77)
    python benchmarks/rollout.py --preset gpu          # ~1B on one GPU (benchmarks/gpu.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_step import PRESETS as TRAIN
from benchmarks.train_step import _sync, child, preset_model

TEMPERATURE, TOP_P = 1.0, 0.9
SEED = 0
FSDP_TARGET = 0.77  # within 1.3x of the unsharded model

PRESETS = {
    # The embedded demo's model: a rollout of 64 tokens for 16 prompts of 16-96 tokens.
    "tiny": dict(model=preset_model("tiny"), batch=16, prompt=(16, 96), new=64, calls=3, target=2.0),
    # conf/model/cpu_100m.yaml: the matmuls (and the 32k-vocabulary head) dominate, as in real models.
    "cpu-100m": dict(model=preset_model("cpu_100m"), batch=8, prompt=(32, 160), new=32, calls=2, target=1.3),
    # train_step.py's ~1B model: 32 prompts of 64-512 tokens, 256 new tokens each.
    "gpu": dict(model=TRAIN["gpu"]["model"], batch=32, prompt=(64, 512), new=256, calls=3, target=1.0),
}


def prompts(p: dict) -> list[list[int]]:
    """BOS then random tokens, lengths spread over the preset's range (so the batch is left-padded)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    lo, hi = p["prompt"]
    lengths = np.linspace(lo, hi, p["batch"]).astype(int)
    rng.shuffle(lengths)
    return [[1, *rng.integers(3, p["model"]["vocab_size"], size=n - 1).tolist()] for n in lengths]


def seeds(p: dict) -> list[int]:
    return list(range(p["batch"]))


def _model_cfg(p: dict):
    from kubellama.conf.schema.model import ModelConfig

    return ModelConfig(**p["model"])


def _timed(call, p: dict, device) -> dict:
    """Seconds of each call after one untimed warm-up call."""
    t0 = time.perf_counter()
    call()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(p["calls"]):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"call_s": times, "warmup_s": warmup}


def _generate(gen, batch: list[list[int]], rows: list[int], p: dict) -> list[list[int]]:
    from kubellama.components.core.model.generate import generate

    out = generate(gen, batch, p["new"], temperature=TEMPERATURE, top_p=TOP_P, eos_id=None, seeds=rows)
    assert all(len(o) == p["new"] for o in out), "a row stopped early: tokens/s would not compare"
    return out


def ours(p: dict) -> dict:
    """The unsharded model: PPO's bf16 generation copy (`consolidated` of a one-process model) generating the
    whole batch."""
    from kubellama.components.core.train.dist import device_for
    from kubellama.components.core.train.parallelize import build_llama, consolidated
    from kubellama.components.core.train.precision import compute_dtype

    device = device_for(0)
    cfg = _model_cfg(p)
    gen = consolidated(build_llama(cfg, SEED).to(device), cfg, "auto", device)
    batch, rows = prompts(p), seeds(p)
    return {**_timed(lambda: _generate(gen, batch, rows, p), p, device), "device": str(device),
            "dtype": str(compute_dtype("auto", device)), "threads": _threads()}


def hf(p: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubellama.components.core.model.hf import hf_config, to_hf_key
    from kubellama.components.core.train.dist import device_for
    from kubellama.components.core.train.parallelize import build_llama
    from kubellama.components.core.train.precision import compute_dtype

    device = device_for(0)
    dtype = compute_dtype("auto", device)
    cfg = _model_cfg(p)
    ours_sd = build_llama(cfg, SEED).state_dict()
    conf = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**conf, attn_implementation="sdpa"))
    model.load_state_dict({to_hf_key(k): v for k, v in ours_sd.items()}, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    batch = prompts(p)
    L = max(len(x) for x in batch)
    ids = torch.tensor([[0] * (L - len(x)) + x for x in batch], device=device)
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in batch], device=device)

    @torch.no_grad()
    def call() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                             top_p=TOP_P, top_k=0, max_new_tokens=p["new"], min_new_tokens=p["new"],
                             eos_token_id=None, pad_token_id=0, use_cache=True)
        assert out.shape == (len(batch), L + p["new"]), out.shape

    return {**_timed(call, p, device), "dtype": str(dtype)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _rank(rank: int, world: int, init: str, p: dict, mode: str, dump: str) -> None:
    """One FSDP rank: the policy sharded as PPO shards it, then rollouts as PPO's `sample` runs them."""
    import torch

    from kubellama.components.core.train import dist
    from kubellama.components.core.train.parallelize import build_llama, consolidated, shard
    from kubellama.conf.schema.ppo import PpoConfig

    # The unsharded run's cores, split between the ranks.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    env = dist.init(init_method=init, rank=rank, world_size=world)
    try:
        cfg = _model_cfg(p)
        ppo = PpoConfig(mixed_precision="auto", rollout=mode)
        policy = shard(build_llama(cfg, SEED), ppo, env)
        batch, rows = prompts(p)[rank::world], seeds(p)[rank::world]
        kept = {"gen": None, "consolidate_s": []}

        def call() -> None:
            dist.barrier()
            t0 = time.perf_counter()
            gen = consolidated(policy, cfg, ppo.mixed_precision, env.device, kept["gen"])
            kept["consolidate_s"].append(time.perf_counter() - t0)
            kept["gen"] = gen if ppo.rollout == "copy" else None
            _generate(gen, batch, rows, p)
            dist.barrier()

        result = _timed(call, p, env.device)
        if env.lead:
            with open(dump, "w") as f:
                json.dump({**result, "consolidate_s": kept["consolidate_s"][1:], "threads": _threads(),
                           "world": world}, f)
    finally:
        dist.shutdown()


def sharded(p: dict, mode: str) -> dict:
    import torch

    fd, rdzv = tempfile.mkstemp(prefix="kl-rdzv-")
    os.close(fd)
    os.remove(rdzv)
    dump = rdzv + ".json"
    torch.multiprocessing.spawn(_rank, args=(p["fsdp"], f"file://{rdzv}", p, mode, dump), nprocs=p["fsdp"])
    with open(dump) as f:
        return json.load(f)


SIDES = {"ours": ours, "hf": hf, "gathered": lambda p: sharded(p, "gathered"), "copy": lambda p: sharded(p, "copy")}
LABELS = {"ours": "kubellama rollout (unsharded)", "hf": "transformers generate (DynamicCache)",
          "gathered": "kubellama FSDP rollout=gathered", "copy": "kubellama FSDP rollout=copy"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (medians shown)")
    ap.add_argument("--fsdp", type=int, default=0, help="ranks: our rollout under FSDP against unsharded")
    ap.add_argument("--batch", type=int, help="prompts per batch (default: the preset's)")
    ap.add_argument("--new", type=int, help="new tokens per prompt (default: the preset's)")
    ap.add_argument("--calls", type=int, help="timed generate calls per round (default: the preset's)")
    ap.add_argument("--child", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset], fsdp=args.fsdp)
    for key in ("batch", "new", "calls"):
        p[key] = getattr(args, key) or p[key]
    flags = ["--preset", args.preset, "--fsdp", str(args.fsdp), "--batch", str(p["batch"]), "--new", str(p["new"]),
             "--calls", str(p["calls"])]
    if args.child:
        print(json.dumps(SIDES[args.child](p)))
        return
    # On a shared CPU box an OpenMP thread that spins waiting for a core another job holds stalls every small op
    # of the step; sleeping instead keeps both sides' figures stable (set OMP_WAIT_POLICY to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sides = ["ours", "gathered", "copy"] if args.fsdp > 1 else ["ours", "hf"]
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            if (r := child(side, flags, __file__)) is not None:
                runs[side].append(r)
    rate = {s: p["batch"] * p["new"] / statistics.median(t for r in rs for t in r["call_s"])
            for s, rs in runs.items() if rs}
    report(p, args, runs, rate, load)
    if len(rate) < len(sides):
        sys.exit(f"ratio n/a: {', '.join(s for s in sides if s not in rate)} failed (see above)")
    if args.fsdp > 1:
        print(f"ratio {min(rate['gathered'], rate['copy']) / rate['ours']:.2f} (target >= {FSDP_TARGET})")
    else:
        print(f"ratio {rate['ours'] / rate['hf']:.2f} (target >= {p['target']})")


def report(p: dict, args, runs: dict[str, list[dict]], rate: dict[str, float], load: float) -> None:
    from kubellama.components.core.model.llama import count_params

    batch = prompts(p)
    info = runs["ours"][0] if runs["ours"] else {"device": "?", "dtype": "?", "threads": "?"}
    device = info["device"]
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(0)
    dtype = {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(info["dtype"], info["dtype"])
    print(f"model: {count_params(_model_cfg(p)) / 1e6:.1f}M params, {dtype} (auto), {device}, "
          f"{info['threads']} threads")
    print(f"batch {p['batch']} prompts of {min(map(len, batch))}-{max(map(len, batch))} tokens (left-padded to "
          f"{max(map(len, batch))}), {p['new']} new tokens each, temperature {TEMPERATURE}, top-p {TOP_P}; "
          f"{args.rounds} rounds x {p['calls']} calls; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    for side, rs in runs.items():
        if not rs:
            continue
        calls = [t for r in rs for t in r["call_s"]]
        rounds = ", ".join(f"{p['batch'] * p['new'] * len(r['call_s']) / sum(r['call_s']):.0f}" for r in rs)
        extra = ""
        if "consolidate_s" in rs[0]:
            cons = statistics.median(t for r in rs for t in r["consolidate_s"])
            extra = f", {rs[0]['world']} ranks x {rs[0]['threads']} threads, consolidation {cons * 1e3:.0f} ms/call"
        print(f"  {LABELS[side]:37s} {rate[side]:9.0f} new tokens/s  (best call "
              f"{p['batch'] * p['new'] / min(calls):.0f}, rounds {rounds}, warm-up "
              f"{statistics.median(r['warmup_s'] for r in rs):.1f} s{extra})")


if __name__ == "__main__":
    main()
