"""Tokens/s of our full training step against transformers' LlamaForCausalLM at full strength, in the same run, with
the machine's measured matmul peak and the MFU both sides reach against it.

Both sides do the same work per step: forward, next-token cross-entropy, backward, gradient clipping at 1.0, fused
AdamW (0.9, 0.95, eps 1e-5, weight decay 0.1) on the same model shape and batch, in the same precision (ours: FSDP2
bf16 compute parameters over fp32 masters; transformers: bf16 autocast over fp32 parameters), with the same
activation checkpointing (every block or none), both compiled or neither. Transformers runs `use_cache=False` and
SDPA attention. Ours is the real thing: the trainer core's `train_step` (FSDP2 on a one-rank group, the LR schedule,
the same code multi-GPU runs use).

Each side runs in its own child process, and rounds alternate (peak, ours, transformers), so peak memory is per side
and load from other processes hits every side alike; tokens/s is taken from the median step over all rounds. The
GEMM peak is measured at the model's matmul shapes, in bf16 and fp32, in each round; MFU is the model FLOPs
achieved (core/model/llama.py `flops_per_token`) over the best peak seen in the compute dtype (on a GPU also
over the data-sheet bf16 peak, core/train/metrics.py).

    python benchmarks/train_step.py                       # tiny model (conf/model/tiny.yaml), target ours/HF >= 1.0
    python benchmarks/train_step.py --preset cpu-100m     # ~134M, bf16, 512 tokens: >= 1.15x and MFU >= 45%
    python benchmarks/train_step.py --preset gpu --compile   # ~1B bf16 on one GPU (benchmarks/gpu.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from kubellama.components.core.model.hf import hf_config
from kubellama.components.core.model.llama import count_params, flops_per_token
from kubellama.components.core.train import dist
from kubellama.components.core.train.dist import device_for
from kubellama.components.core.train.metrics import PEAK_BF16
from kubellama.components.core.train.optim import lr_factor
from kubellama.components.core.train.precision import compute_dtype, gemm_rate, model_gemm_shapes
from kubellama.components.core.train.trainer import Trainer
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def preset_model(name: str, **change) -> dict:
    """A conf/model preset as ModelConfig fields, with rows one token longer than its context (a row of L + 1
    tokens trains L positions)."""
    import yaml

    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml")) as f:
        preset = yaml.safe_load(f)
    # A preset that also sets recipe values (`# @package _global_`, llama2_70b) nests its shape under `model`.
    model = {k: v for k, v in preset.get("model", preset).items() if k != "name"}
    model.update(change)
    model["max_seq_len"] += 1
    return model


PRESETS = {
    # The embedded demo's model at its 256-token context; `auto` precision (bf16 where the CPU has it).
    "tiny": dict(model=preset_model("tiny"), batch=8, steps=6, warmup=2, precision="auto", ac="none", target=1.0),
    # conf/model/cpu_100m.yaml: matmul-dominated, as real models are.
    "cpu-100m": dict(model=preset_model("cpu_100m"), batch=4, steps=4, warmup=2, precision="bf16", ac="none",
                     target=1.15, mfu_target=0.45),
    # ~1.0B parameters (Llama 2 shapes scaled down: 16 x 2048, 32k vocabulary), 2k context.
    "gpu": dict(model=dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_hidden=5632, vocab_size=32000,
                           max_seq_len=2049), batch=4, steps=20, warmup=5, precision="bf16", ac="none", target=1.0,
                mfu_target=0.45),
}


class RandomRows:
    """A BatchSource of random token rows (the data path is not what is measured)."""

    def __init__(self, seq_len: int, vocab: int, seed: int = 0):
        import numpy as np

        self.seq_len, self.vocab = seq_len, vocab
        self.rng = np.random.default_rng(seed)

    def next_batch(self, rows: int):
        return {"tokens": self.rng.integers(0, self.vocab, size=(rows, self.seq_len))}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(step, p: dict, device) -> dict:
    """Wall and CPU seconds of each timed step: the parent takes the median over every step of every round, which a
    burst of other load on the machine moves less than a round's mean. CPU seconds (all threads of the process)
    are what the step itself consumed: on a shared box other jobs stretch the wall time, much less the CPU time."""
    times, cpu = [], []
    for _ in range(p["steps"]):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"step_s": times, "cpu_s": cpu, "peak_gib": _peak_gib(device)}


def _dtype(p: dict, device):
    return compute_dtype(p["precision"], device)


def ours(p: dict) -> dict:
    env = dist.init()
    mcfg = ModelConfig(**p["model"])
    seq = mcfg.max_seq_len
    tcfg = TrainConfig(lr=3e-4, warmup_steps=10, max_steps=1000, global_batch_tokens=p["batch"] * seq,
                       micro_batch=p["batch"], seq_len=seq, mixed_precision=p["precision"],
                       activation_checkpointing=p["ac"], compile=p["compile"])
    trainer = Trainer(tcfg, mcfg, tempfile.mkdtemp(prefix="kl-bench-"), RandomRows(seq, mcfg.vocab_size), env=env)
    t0 = time.perf_counter()
    for _ in range(p["warmup"]):
        trainer.train_step()
    return {**_timed(trainer.train_step, p, env.device), "warmup_s": time.perf_counter() - t0,
            "device": str(env.device), "dtype": str(_dtype(p, env.device))}


def hf(p: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    device = device_for(0)
    dtype = _dtype(p, device)
    mcfg = ModelConfig(**p["model"])
    seq = mcfg.max_seq_len
    torch.manual_seed(0)
    cfg = {k: v for k, v in hf_config(mcfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa", use_cache=False)).to(device)
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2 and "embed_tokens" not in n]
    keep = [q for n, q in model.named_parameters() if not (q.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-5, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10, 1000, 0.1))
    data = RandomRows(seq, mcfg.vocab_size)
    if p["ac"] == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if p["compile"]:
        for layer in model.model.layers:
            layer.compile()  # the same blocks ours compiles (pretrain.compile=true)

    def step() -> None:
        tokens = torch.from_numpy(data.next_batch(p["batch"])["tokens"]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    t0 = time.perf_counter()
    for _ in range(p["warmup"]):
        step()
    return {**_timed(step, p, device), "warmup_s": time.perf_counter() - t0}


def peak(p: dict) -> dict:
    """Measured matmul FLOP/s at the model's shapes, bf16 and fp32 (best shape of each)."""
    import torch

    device = device_for(0)
    shapes = model_gemm_shapes(ModelConfig(**p["model"]), p["batch"] * (p["model"]["max_seq_len"] - 1))
    return {name: max(gemm_rate(*s, dtype, budget_s=0.3, device=device) for s in shapes)
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


SIDES = {"peak": peak, "ours": ours, "hf": hf}


def child(side: str, flags: list[str], script: str = __file__) -> dict | None:
    """One side's run of `script` in a fresh process; None (its error printed) when it failed, so the other sides
    still report (a device run is too scarce to lose to one side's failure)."""
    out = subprocess.run([sys.executable, script, "--child", side, *flags], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        print(f"{side} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (medians shown)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (ours: pretrain.compile=true)")
    ap.add_argument("--batch", type=int, help="micro-batch rows (default: the preset's)")
    ap.add_argument("--steps", type=int, help="timed steps per round (default: the preset's)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    ap.add_argument("--ac", choices=["none", "full"], help="activation checkpointing of every block, both sides")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="compute dtype, both sides")
    ap.add_argument("--child", choices=sorted(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset], compile=args.compile)
    for key in ("batch", "steps", "warmup", "ac", "precision"):
        p[key] = getattr(args, key) or p[key]
    flags = ["--preset", args.preset, "--batch", str(p["batch"]), "--steps", str(p["steps"]), "--warmup",
             str(p["warmup"]), "--ac", p["ac"], "--precision", p["precision"]] + (["--compile"] if args.compile else [])
    if args.child:
        print(json.dumps(SIDES[args.child](p)))
        return
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            if (r := child(side, flags)) is not None:
                runs[side].append(r)
    if all(runs.values()):
        report(p, args, runs, load)
        return
    tokens = p["batch"] * (p["model"]["max_seq_len"] - 1)
    for side, rs in runs.items():
        if rs and "step_s" in rs[0]:
            print(f"  {side}: {tokens / statistics.median(t for r in rs for t in r['step_s']):.0f} tokens/s")
    sys.exit(f"ratio n/a: {', '.join(s for s, rs in runs.items() if not rs)} failed (see above)")


def report(p: dict, args, runs: dict[str, list[dict]], load: float) -> None:
    mcfg = ModelConfig(**p["model"])
    tokens = p["batch"] * (mcfg.max_seq_len - 1)
    flops = flops_per_token(mcfg, mcfg.max_seq_len - 1)
    info = runs["ours"][0]
    on_gpu = info["device"].startswith("cuda")
    dtype = "bf16" if info["dtype"] == "torch.bfloat16" else "fp32"
    steps = {s: [t for r in runs[s] for t in r["step_s"]] for s in ("ours", "hf")}
    med = {s: tokens / statistics.median(steps[s]) for s in steps}
    peaks = {k: max(r[k] for r in runs["peak"]) for k in ("bf16", "fp32")}
    mem = {s: max(r["peak_gib"] for r in runs[s]) for s in steps}
    sheet, name = None, info["device"]
    if on_gpu:
        import torch

        name = torch.cuda.get_device_name(0)
        sheet = next((v for k, v in PEAK_BF16 if k in name), None)
    print(f"model: {count_params(mcfg) / 1e6:.1f}M params, batch {p['batch']} x {mcfg.max_seq_len - 1} tokens, "
          f"{dtype} ({p['precision']}), AC {p['ac']}, compiled: {p['compile']}, {name}, {args.rounds} rounds x "
          f"{p['steps']} steps, load average before {load:.2f}")
    print(f"measured GEMM peak at the model's shapes: bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s, "
          f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s; model {flops / 1e9:.3f} GFLOP/token")
    mem_kind = "peak GPU memory" if on_gpu else "peak RSS"
    mfu = {s: med[s] * flops / peaks[dtype] for s in steps}
    for s, label in (("ours", "kubellama trainer step"), ("hf", "transformers LlamaForCausalLM")):
        label += " (compiled)" if p["compile"] else ""
        best = tokens / min(steps[s])
        rounds = ", ".join(f"{tokens * len(r['step_s']) / sum(r['step_s']):.0f}" for r in runs[s])
        on_sheet = f"  MFU {med[s] * flops / sheet * 100:.1f}% of the {sheet / 1e12:.0f} TFLOP/s data sheet" if sheet else ""
        print(f"  {label:41s} {med[s]:9.0f} tokens/s  MFU {mfu[s] * 100:.1f}% of measured {dtype} peak{on_sheet}  "
              f"{mem_kind} {mem[s]:.2f} GiB  (best step {best:.0f}, rounds {rounds}, warm-up "
              f"{statistics.median(r['warmup_s'] for r in runs[s]):.0f} s)")
    print(f"memory ours/HF {mem['ours'] / mem['hf']:.2f}x")
    if not on_gpu:
        per_cpu = {s: tokens / statistics.median(t for r in runs[s] for t in r["cpu_s"]) for s in steps}
        print(f"tokens per CPU-second (load-robust): ours {per_cpu['ours']:.0f}, transformers {per_cpu['hf']:.0f}, "
              f"ratio {per_cpu['ours'] / per_cpu['hf']:.2f}")
    if "mfu_target" in p:
        print(f"MFU ours {mfu['ours'] * 100:.1f}% of the measured {dtype} GEMM peak (target >= "
              f"{p['mfu_target'] * 100:.0f}%)")
    print(f"ratio {med['ours'] / med['hf']:.2f} (target >= {p['target']})")


if __name__ == "__main__":
    main()
