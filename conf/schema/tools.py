from dataclasses import dataclass


@dataclass
class GenerateConfig:
    """Sampling defaults shared by `kubellama generate`, rejection sampling, PPO rollouts and eval."""

    max_new_tokens: int = 64
    # 0 means greedy. Safety eval uses 0.1 / top-p 0.9 (paper §4.1).
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0


@dataclass
class PlanConfig:
    """Inputs of `kubellama plan`: the memory a model needs per GPU under FSDP (full sharding)."""

    world_size: int = 8
    seq_len: int = 4096
    micro_batch: int = 1
    # Bytes per parameter for the compute copy: bf16 = 2.
    param_dtype: str = "bf16"
    activation_checkpointing: bool = True
    gpu_memory_gib: float = 80.0
