"""Back-of-the-envelope memory per GPU for training under FSDP2 full sharding.

Assumes what the trainer core does on GPU: fp32 sharded master parameters, bf16 all-gathered compute copies of up to
two blocks at a time (current + prefetched), fp32 sharded gradients, AdamW's two fp32 moments, SDPA (flash)
attention so no T×T score matrix is stored, fp32 logits for the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from components.core.model import count_params
from conf.schema.model import ModelConfig
from conf.schema.tools import PlanConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GIB = 1024**3


@dataclass
class Plan:
    params: int
    world_size: int
    weights: float
    gathered: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gathered + self.grads + self.optimizer + self.activations


def activation_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, nbytes: int, checkpointing: bool) -> float:
    tokens = seq_len * micro_batch
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    # Tensors one block saves for backward: norm inputs/outputs, q, attention output, o_proj input (6·dim),
    # k and v (2·kv_dim), and gate, up, silu(gate), their product (4·ffn).
    per_block = tokens * (6 * cfg.dim + 2 * kv_dim + 4 * cfg.ffn_hidden) * nbytes
    logits = tokens * cfg.vocab_size * 4 * 2  # fp32 logits and their gradient
    if checkpointing:
        # Only block inputs are kept; one block is recomputed at a time during backward.
        return cfg.n_layers * tokens * cfg.dim * nbytes + per_block + logits
    return cfg.n_layers * per_block + logits


def plan(cfg: ModelConfig, p: PlanConfig) -> Plan:
    if p.param_dtype not in DTYPE_BYTES:
        raise ValueError(f"plan.param_dtype must be one of {sorted(DTYPE_BYTES)}, not {p.param_dtype!r}")
    n = count_params(cfg)
    w = p.world_size
    nbytes = DTYPE_BYTES[p.param_dtype]
    block = (n - 2 * cfg.vocab_size * cfg.dim) / max(cfg.n_layers, 1)
    return Plan(
        params=n,
        world_size=w,
        weights=n * 4 / w,
        gathered=2 * block * nbytes,
        grads=n * 4 / w,
        optimizer=n * 8 / w,
        activations=activation_bytes(cfg, p.seq_len, p.micro_batch, nbytes, p.activation_checkpointing),
    )


def format_plan(cfg: ModelConfig, p: PlanConfig, result: Plan) -> str:
    rows = [
        ("weights (fp32 shard)", result.weights),
        (f"gathered blocks ({p.param_dtype})", result.gathered),
        ("gradients (fp32 shard)", result.grads),
        ("optimizer (AdamW, fp32 shard)", result.optimizer),
        (f"activations (micro-batch {p.micro_batch} x {p.seq_len}"
         f"{', checkpointed' if p.activation_checkpointing else ''})", result.activations),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"model {cfg.name}: {result.params:,} parameters",
             f"FSDP full sharding over {result.world_size} GPUs, per GPU:"]
    lines += [f"  {name.ljust(width)}  {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"  {'total'.ljust(width)}  {result.total / GIB:9.2f} GiB")
    verdict = "fits" if result.total <= p.gpu_memory_gib * GIB * 0.9 else "does NOT fit"
    lines.append(f"{verdict} in {p.gpu_memory_gib:g} GiB (keeping 10% for the allocator and NCCL buffers)")
    return "\n".join(lines)
