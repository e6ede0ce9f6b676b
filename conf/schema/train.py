from dataclasses import dataclass


@dataclass
class OptimConfig:
    """AdamW and its LR schedule (paper §2.2 defaults): what every trained model's optimizer reads."""

    # Peak learning rate (§2.2, Table 1: 3e-4 for 7B/13B, 1.5e-4 for 34B/70B).
    lr: float = 3e-4
    # AdamW β1 (§2.2: 0.9).
    beta1: float = 0.9
    # AdamW β2 (§2.2: 0.95).
    beta2: float = 0.95
    # AdamW ε (§2.2: 1e-5).
    eps: float = 1e-5
    # AdamW weight decay on matrices, not on norms or embeddings (§2.2: 0.1).
    weight_decay: float = 0.1
    # Gradient norm clipping threshold (§2.2: 1.0); 0: no clipping.
    grad_clip: float = 1.0
    # Optimizer steps of linear LR warmup (§2.2: 2000).
    warmup_steps: int = 2000
    # Cosine decay ends at this fraction of the peak learning rate.
    min_lr_ratio: float = 0.1
    # Optimizer steps of the run and the cosine's length (500k × 4M tokens ≈ §2.2's 2T).
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

    # Rows per forward/backward on each rank; gradients accumulate to the global batch.
    micro_batch: int = 1
    # auto: bf16 compute with fp32 master weights and reduction on GPU and on CPUs with native bf16 (AMX,
    # AVX512-BF16); fp32 on other CPUs. Pin fp32 where results must match exactly across runs or rank counts.
    mixed_precision: str = "auto"
    # none | full | every_k
    activation_checkpointing: str = "none"
    # every_k: checkpoint every k-th transformer block (1 of k), trading memory for recompute.
    ac_every: int = 2
    # torch.compile each transformer block (torchtitan's recipe): worth it on GPUs, no gain on CPU and ~35 s to warm.
    compile: bool = False


@dataclass
class CheckpointConfig:
    # Periodic checkpoints are written in the background (DCP async_save); SIGTERM saves the last finished step.
    ckpt_every: int = 1000
    # Complete checkpoints kept; older ones are deleted (0: keep all).
    keep_last: int = 3


@dataclass
class TrainConfig(CheckpointConfig, ComputeConfig, BatchConfig, OptimConfig):
    """The trainer core's knobs, shared by every token-batch training stage (flat keys: `pretrain.lr`)."""

    # Optimizer steps between metric log lines (the first and last step are logged too).
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
