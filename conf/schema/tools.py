from dataclasses import dataclass


@dataclass
class GenerateConfig:
    """Sampling defaults shared by `kubellama generate`, rejection sampling, PPO rollouts and eval."""

    # `kubellama generate`: tokens generated at most per answer (--max-new-tokens overrides).
    max_new_tokens: int = 64
    # 0 means greedy. Safety eval uses 0.1 / top-p 0.9 (paper §4.1).
    temperature: float = 0.6
    # Nucleus sampling: draw from the smallest token set whose probability reaches top_p.
    top_p: float = 0.9
    # Random seed of the sampling.
    seed: int = 0


@dataclass
class PlanConfig:
    """Inputs of `kubellama plan`: the memory a model needs per GPU under FSDP (full sharding)."""

    # GPUs the FSDP model is fully sharded over.
    world_size: int = 8
    # Tokens per row in the memory estimate (activations; PPO's KV cache).
    seq_len: int = 4096
    # Rows per forward for the activation estimate (PPO's uses ppo.micro_batch).
    micro_batch: int = 1
    # Bytes per parameter for the compute copy: bf16 = 2.
    param_dtype: str = "bf16"
    # Estimate activations as with every block checkpointed (only block inputs kept).
    activation_checkpointing: bool = True
    # GPU memory in GiB; the plan fits when its total stays within 90% of it.
    gpu_memory_gib: float = 80.0
    # Cost ledger (components/core/cost.py): GPU-hours and tCO2eq of training on `tokens` tokens.
    tokens: float = 2.0e12  # the paper's pretraining budget (§2.2)
    gpu: str = "a100-80gb"  # a100-80gb | a100-40gb | h100 | h200 | l40s (Table 2: A100-80GB at 400 W)
    # Model FLOPs utilisation; 0: the one Table 2 implies for 7B (2T tokens in 184,320 GPU-hours, about 39%).
    mfu: float = 0.0
    # Board power in watts; 0: the GPU's (400 W for the A100-80GB, as Table 2).
    gpu_power_w: float = 0.0
