from dataclasses import dataclass


@dataclass
class OptimConfig:
    """AdamW and its LR schedule (paper §2.2 defaults): what every trained model's optimizer reads."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    # Cosine decay ends at this fraction of the peak learning rate.
    min_lr_ratio: float = 0.1
    max_steps: int = 500_000


@dataclass
class BatchConfig:
    """Token batches of packed rows (§2.2)."""

    # 4M tokens per optimizer step (≈ 1024 × 4096); micro-batches accumulate to reach it.
    global_batch_tokens: int = 4_194_304
    seq_len: int = "${model.max_seq_len}"  # type: ignore[assignment]


@dataclass
class ComputeConfig:
    """How a step runs on the hardware: rows per forward, precision, activation checkpointing, compilation."""

    micro_batch: int = 1
    # auto: bf16 compute with fp32 master weights and reduction on GPU and on CPUs with native bf16 (AMX,
    # AVX512-BF16); fp32 on other CPUs. Pin fp32 where results must match exactly across runs or rank counts.
    mixed_precision: str = "auto"
    # none | full | every_k
    activation_checkpointing: str = "none"
    ac_every: int = 2
    # torch.compile each transformer block (torchtitan's recipe): worth it on GPUs, no gain on CPU and ~35 s to warm.
    compile: bool = False


@dataclass
class CheckpointConfig:
    # Periodic checkpoints are written in the background (DCP async_save); SIGTERM saves the last finished step.
    ckpt_every: int = 1000
    keep_last: int = 3


@dataclass
class TrainConfig(CheckpointConfig, ComputeConfig, BatchConfig, OptimConfig):
    """The trainer core's knobs, shared by every token-batch training stage (flat keys: `pretrain.lr`)."""

    log_every: int = 10


# Keys that do not change what a run computes: resuming with other values is allowed (components/core/runs.py).
# micro_batch and mixed_precision change rounding, not the recipe: a run preempted on one node type may resume on
# another (an `auto` precision resolves per machine), and the master weights and optimizer state stay fp32 either way.
VOLATILE = ("output", "data", "ckpt_every", "keep_last", "log_every", "compile", "activation_checkpointing",
            "ac_every", "micro_batch", "mixed_precision")


@dataclass
class PretrainConfig(TrainConfig):
    # Token shards; empty: the data prep output of this config (content-addressed under <run.root>/data/).
    data: str = ""
    # Empty: <run.root>/<run.id>/pretrain.
    output: str = ""
    # Start from these weights instead of random ones: an HF Llama directory or a kubellama DCP checkpoint (a
    # step_* folder or a checkpoints/ folder: its newest complete step), local or s3://.
    init: str = ""
