from dataclasses import dataclass

from kubellama.conf.schema.train import VOLATILE, TrainConfig


@dataclass
class SftTrainConfig(TrainConfig):
    """Supervised fine-tuning (paper §3.1): "a cosine learning rate schedule with an initial learning rate of 2e-5, a
    weight decay of 0.1, a batch size of 64, and a sequence length of 4096 tokens", 2 epochs, packed examples with
    the loss on answer tokens only."""

    # §3.1: initial (peak) learning rate 2e-5, on a cosine schedule.
    lr: float = 2e-5
    # §3.1: weight decay 0.1.
    weight_decay: float = 0.1
    # §3.1 names no warmup: the cosine starts at the peak. Where it ends is not given either; we keep pretraining's
    # 10% of the peak (min_lr_ratio).
    warmup_steps: int = 0
    # 64 rows of 4096 tokens.
    global_batch_tokens: int = 64 * 4096
    # §3.1: 2 epochs over the training rows (when max_steps is 0).
    epochs: int = 2
    # 0: epochs × steps per epoch (whole global batches of the training rows, the remainder of an epoch dropped).
    # > 0 stops after that many steps instead, epochs or not.
    max_steps: int = 0
    # Loss on every assistant turn ("all") or on the last turn of each dialog only ("last").
    loss_turns: str = "all"
    # Held-out rows scored at the start and after every epoch (0: the whole held-out set).
    eval_rows: int = 0
    # At the paper's scale an epoch is ~50 steps: checkpoints come at epoch ends and the last step; keep them all.
    ckpt_every: int = 100
    keep_last: int = 0
    log_every: int = 5
    # SFT shards; empty: the data prep output of this config (its sft/train and sft/eval).
    data: str = ""
    # Empty: <run.root>/<run.id>/sft.
    output: str = ""
    # The model to fine-tune: the pretraining output in the pipeline, or any HF Llama directory or kubellama
    # checkpoint, local or s3://. Empty: random weights (tests only).
    init: str = ""


# Keys that do not change the weights an SFT-body run ends with.
SFT_VOLATILE = VOLATILE + ("eval_rows",)
