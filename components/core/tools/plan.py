"""`kubellama plan`: back-of-the-envelope memory per GPU for training under FSDP2 full sharding, and the cost ledger.

Assumes what the trainer core does on GPU: fp32 sharded master parameters, bf16 all-gathered compute copies of up to
two blocks at a time (current + prefetched), fp32 sharded gradients, AdamW's two fp32 moments, SDPA (flash)
attention so no T×T score matrix is stored, fp32 logits for the loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubellama.components.core.model.llama import count_params
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.core.tools.cost import estimate, format_cost
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.ppo import PpoConfig
from kubellama.conf.schema.tools import PlanConfig

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
        ((f"activations (micro-batch {p.micro_batch} x {p.seq_len}"
         f"{', checkpointed' if p.activation_checkpointing else ''})"), result.activations),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"model {cfg.name}: {result.params:,} parameters",
             f"FSDP full sharding over {result.world_size} GPUs, per GPU:"]
    lines += [f"  {name.ljust(width)}  {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"  {'total'.ljust(width)}  {result.total / GIB:9.2f} GiB")
    verdict = "fits" if result.total <= p.gpu_memory_gib * GIB * 0.9 else "does NOT fit"
    lines.append(f"{verdict} in {p.gpu_memory_gib:g} GiB (keeping 10% for the allocator and NCCL buffers)")
    return "\n".join(lines)


@dataclass
class PpoPlan:
    """PPO's memory per GPU (ppo.*): two trained models (policy, value), three frozen ones (reference, two reward
    models), and the rollout's unsharded policy and KV cache. Rollouts and updates do not overlap, so the peak is the
    larger of the two phases over what persists."""
    trained: float  # policy and value: fp32 weights, gradients and AdamW moments, sharded
    frozen: float  # reference and both RMs, sharded, in ppo.frozen's dtype (0 on the GPU when offloaded)
    gathered: float  # compute copies of two blocks of the largest model at a time
    rollout_model: float  # the unsharded bf16 policy generation runs on
    kv_cache: float
    activations: float  # policy and value micro-batches in the update, checkpointed or not
    rollout_persists: bool  # ppo.rollout=copy keeps the unsharded policy between phases

    @property
    def rollout_phase(self) -> float:
        return self.trained + self.frozen + self.gathered + self.rollout_model + self.kv_cache

    @property
    def update_phase(self) -> float:
        return (self.trained + self.frozen + self.gathered + self.activations
                + (self.rollout_model if self.rollout_persists else 0.0))

    @property
    def total(self) -> float:
        return max(self.rollout_phase, self.update_phase)


def _rows(p: PlanConfig, ppo: PpoConfig) -> int:
    """Rows a rank generates at once: its share of the iteration's prompts, `ppo.rollout_batch` at a time."""
    rows = max(ppo.prompts_per_batch // p.world_size, 1)
    return min(rows, ppo.rollout_batch) if ppo.rollout_batch > 0 else rows


def ppo_plan(cfg: ModelConfig, p: PlanConfig, ppo: PpoConfig) -> PpoPlan:
    """Rows of `p.seq_len` tokens (prompt + response); reward and value models have the policy's shape with a
    scalar head instead of the LM head (Llama 2's RMs start from the chat model)."""
    n = count_params(cfg)
    scalar = n - cfg.vocab_size * cfg.dim + cfg.dim
    w = p.world_size
    nbytes = DTYPE_BYTES[p.param_dtype]
    frozen_bytes = {"bf16": nbytes, "offload": 0, "fp32": 4}.get(ppo.frozen)
    if frozen_bytes is None:
        raise ValueError(f"ppo.frozen must be one of bf16, offload, fp32, not {ppo.frozen!r}")
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    rows = _rows(p, ppo)
    value_acts = activation_bytes(cfg, p.seq_len, ppo.micro_batch, nbytes, p.activation_checkpointing) \
        - p.seq_len * ppo.micro_batch * cfg.vocab_size * 8
    return PpoPlan(
        trained=(n + scalar) * 16 / w,
        frozen=(n + 2 * scalar) * frozen_bytes / w,
        gathered=2 * (n - 2 * cfg.vocab_size * cfg.dim) / max(cfg.n_layers, 1) * nbytes,
        rollout_model=n * nbytes,
        kv_cache=2 * cfg.n_layers * rows * p.seq_len * kv_dim * nbytes,
        activations=activation_bytes(cfg, p.seq_len, ppo.micro_batch, nbytes, p.activation_checkpointing)
        + value_acts,
        rollout_persists=ppo.rollout == "copy",
    )


def format_ppo_plan(p: PlanConfig, ppo: PpoConfig, result: PpoPlan) -> str:
    rows = [
        ("policy + value: fp32 weights, grads, AdamW", result.trained),
        (f"reference + 2 reward models ({ppo.frozen})", result.frozen),
        (f"gathered blocks ({p.param_dtype})", result.gathered),
        (f"rollout: unsharded policy ({p.param_dtype}, ppo.rollout={ppo.rollout})", result.rollout_model),
        (f"rollout: KV cache ({_rows(p, ppo)} rows x {p.seq_len})", result.kv_cache),
        (f"update: activations (micro-batch {ppo.micro_batch}, policy + value)", result.activations),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"PPO (ppo.*) over {p.world_size} GPUs, per GPU:"]
    lines += [f"  {name.ljust(width)}  {value / GIB:9.2f} GiB" for name, value in rows]
    lines.append(f"  {'peak: rollout phase'.ljust(width)}  {result.rollout_phase / GIB:9.2f} GiB")
    lines.append(f"  {'peak: update phase'.ljust(width)}  {result.update_phase / GIB:9.2f} GiB")
    verdict = "fits" if result.total <= p.gpu_memory_gib * GIB * 0.9 else "does NOT fit"
    hint = "" if verdict == "fits" else " (try ppo.frozen=offload, ppo.rollout_batch, or more GPUs)"
    lines.append(f"PPO {verdict} in {p.gpu_memory_gib:g} GiB{hint}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("plan", "Parameter count, per-GPU memory under FSDP (plan.world_size, plan.seq_len, ...) and the "
                       "cost ledger: GPU-hours and tCO2eq for plan.tokens on plan.gpu.")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = load_config(args.overrides)
        p = cfg.plan
        memory = plan(cfg.model, p)
        cost = estimate(memory.params, p.tokens, p.gpu, p.mfu, p.gpu_power_w)
        print(format_plan(cfg.model, p, memory))
        print(format_ppo_plan(p, cfg.ppo, ppo_plan(cfg.model, p, cfg.ppo)))
        print(format_cost(cfg.model.name, p.tokens, cost, derived_mfu=not p.mfu))
        return 0

    return guarded(go)
