"""The compute dtype a run trains in, and the GEMM rate the machine reaches in it (the denominator of MFU on CPU).

`mixed_precision=auto` means bf16 wherever bf16 matrix products run natively: every GPU we train on, and CPUs with
AMX or AVX512-BF16, where oneDNN's bf16 GEMMs run 2-5x faster than fp32 ones. Elsewhere bf16 is emulated and slower
than fp32, so auto stays fp32 there. Either way the master weights, the optimizer state and the gradient reduction
stay fp32 (core/train/parallelize.py `mp_policy`).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import torch

from kubellama.components.core.errors import ConfigError
from kubellama.conf.schema.model import ModelConfig

MODES = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of the x86 units that multiply bf16 natively (Intel AMX tiles, AVX512-BF16 dot products on
# Intel Cooper Lake+ and AMD Zen 4+).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where there is no cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def native_bf16_cpu(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with `flags`) multiplies bf16 natively."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return any(f in flags for f in BF16_FLAGS)
    # Without cpuinfo (containers that hide it, other OSes), torch's own dispatch level is the next best witness.
    return "AMX" in torch.backends.cpu.get_cpu_capability()


def compute_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in for `mixed_precision=mode` on `device`."""
    if mode not in MODES:
        raise ConfigError(f"mixed_precision={mode!r}: expected auto, bf16 or fp32")
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" or native_bf16_cpu() else "fp32"
    return torch.bfloat16 if mode == "bf16" else torch.float32


def model_gemm_shapes(cfg: ModelConfig, rows: int, head: bool = True) -> list[tuple[int, int, int]]:
    """The (m, k, n) of a forward pass's matrix products over `rows` tokens: QKV, output projection, MLP up and
    down, and (with `head`) the vocabulary head."""
    head_dim = cfg.dim // cfg.n_heads
    qkv = (cfg.n_heads + 2 * (cfg.n_kv_heads or cfg.n_heads)) * head_dim
    shapes = [(rows, cfg.dim, qkv), (rows, cfg.dim, cfg.dim), (rows, cfg.dim, cfg.ffn_hidden),
              (rows, cfg.ffn_hidden, cfg.dim)]
    return shapes + [(rows, cfg.dim, cfg.vocab_size)] if head else shapes


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, budget_s: float = 0.1,
              device: torch.device | None = None) -> float:
    """Best FLOP/s of `(m, k) @ (k, n)` over repeats within about `budget_s` (one warm-up first)."""
    device = device or torch.device("cpu")
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)

    def once() -> float:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s or best == float("inf"):
        best = min(best, once())
    return 2.0 * m * k * n / best


# The best matmul rate measured so far, per (shapes, dtype, threads).
_PEAKS: dict[tuple, float] = {}


def gemm_peak(shapes: Iterable[tuple[int, int, int]], dtype: torch.dtype, remeasure: bool = False) -> float:
    """The CPU's measured matmul peak (FLOP/s) in `dtype`: the best rate over `shapes`, about 0.3 s the first time,
    then cached per process (per thread count: ranks sharing a host each own a slice of its cores).

    `remeasure`: measure again and keep the better of the two. A shared host can be busy during the first
    measurement; a step that then runs faster than that "peak" shows it was low (an MFU above 100%)."""
    key = (tuple(shapes), dtype, torch.get_num_threads())
    if key not in _PEAKS or remeasure:
        rate = max(gemm_rate(*shape, dtype, budget_s=0.3 / len(key[0])) for shape in key[0])
        _PEAKS[key] = max(rate, _PEAKS.get(key, 0.0))
    return _PEAKS[key]