from dataclasses import dataclass, field

from kubellama.conf.schema.train import VOLATILE as TRAIN_VOLATILE
from kubellama.conf.schema.train import TrainConfig

KINDS = ("helpfulness", "safety")
WHITEN = ("batch", "running")


@dataclass
class CombinedRewardConfig:
    """How PPO and rejection sampling turn the two RM scores into one reward (paper §3.2.3), written once in
    components/core/rlhf/combined.py: R_c = R_s if the prompt is safety-tagged or R_s < threshold, else R_h;
    then whiten(logit(R_c)) (PPO only)."""

    # §3.2.3: 0.15 gives precision 0.89 and recall 0.55 on the paper's safety test set.
    safety_threshold: float = 0.15
    # Whitening statistics: "batch" (mean and std of the current batch, over all ranks) or "running" (every score
    # seen so far, kept in the PPO checkpoint). The paper does not say which.
    whiten: str = "batch"
    # Probabilities are clipped to [eps, 1 - eps] before the logit; eps also keeps the std away from 0.
    eps: float = 1e-6


@dataclass
class RewardVariantConfig:
    """One reward model's own settings (`reward.helpfulness.*`, `reward.safety.*`): each key set here overrides the
    shared `reward.<key>` for that model only (null: the shared value). The pipeline trains both models side by side
    from the one `reward` section; each step receives its own settings merged."""

    # This RM's own reward.lr (null: the shared one).
    lr: float | None = None
    # This RM's own reward.warmup_steps (null: the shared one).
    warmup_steps: int | None = None
    # This RM's own reward.max_steps (null: the shared one).
    max_steps: int | None = None
    # This RM's own reward.pairs_per_batch (null: the shared one).
    pairs_per_batch: int | None = None
    # This RM's own reward.micro_batch (null: the shared one).
    micro_batch: int | None = None
    # This RM's own reward.margin (null: the shared one).
    margin: str | None = None
    # This RM's own reward.other_fraction (null: the shared one).
    other_fraction: float | None = None
    # This RM's own reward.world_samples (null: the shared one).
    world_samples: int | None = None


@dataclass
class SafetyVariantConfig(RewardVariantConfig):
    """The safety RM's settings, with its own key: the auxiliary loss."""

    # Table 29: weight of the safety auxiliary loss, a binary cross-entropy on each response's safety label
    # (sigmoid(score) > 0.5 means safe). It calibrates the score's absolute level (the ranking loss alone is blind to
    # a constant shift), so the combined reward's σ(R_s) < 0.15 rule means what the paper means; Table 29: unsafe
    # recall at 0.5 rises from 73.0 to 90.4 with it. The paper gives no weight: 1.0, the two losses on equal terms.
    # 0 turns it off.
    aux_loss_weight: float | None = 1.0


@dataclass
class RewardConfig(TrainConfig):
    """A reward model (paper §3.2.2): helpfulness or safety, a Llama with a scalar head on the binary ranking loss
    with a rating margin. `kind` picks which; the pipeline trains both side by side."""

    # Which RM this section trains: helpfulness or safety (the pipeline trains both).
    kind: str = "helpfulness"
    # The data prep output (preference/{train,eval}.jsonl and tokenizer.model); empty: this config's.
    data: str = ""
    # Empty: <run.root>/<run.id>/reward_<kind>.
    output: str = ""
    # The model to start from (§3.2.2: the chat model): an HF Llama directory or any stage output or checkpoint.
    # The LM head is dropped and a new scalar head added. Empty: random weights (tests only).
    init: str = ""
    # §3.2.2: max LR 1e-5 (5e-6 for 70B), cosine to 10%, warmup 3% of the steps (at least 5), one epoch.
    lr: float = 1e-5
    # -1: warmup_fraction of the steps, at least warmup_min.
    warmup_steps: int = -1
    # §3.2.2: warmup over 3% of the steps (when warmup_steps is -1).
    warmup_fraction: float = 0.03
    # Fewest warmup steps when warmup_steps is -1 (at most all steps).
    warmup_min: int = 5
    # 0: one epoch over the training mix.
    max_steps: int = 0
    # §3.2.2: 512 pairs per batch. `micro_batch` counts pairs too; `global_batch_tokens` is not used (the batch is
    # pairs_per_batch · seq_len tokens at most).
    pairs_per_batch: int = 512
    # Pairs per forward/backward on each rank; they accumulate to pairs_per_batch.
    micro_batch: int = 4
    # Table 27: rating margins m(r) in the loss: none, small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0).
    margin: str = "small"
    # The share of the training mix taken from the other kind's pairs (§3.2.2). None: the paper's, 0.5 for
    # helpfulness (all helpfulness data plus an equal amount of safety data) and 0.1 for safety (90/10).
    other_fraction: float | None = None
    # With data prep's world on: this many answers drawn from `init` (T = 1, one per world task prompt of the
    # training pairs) and judged by the rule, every wrong one paired under a right one (issue 21). They add the
    # policy's own errors to the hand-made corruptions; the helpfulness RM only (`reward.helpfulness.world_samples`).
    world_samples: int = 0
    # Per-model settings over the shared ones above; the safety RM's auxiliary loss (Table 29) is set there.
    helpfulness: RewardVariantConfig = field(default_factory=RewardVariantConfig)
    safety: SafetyVariantConfig = field(default_factory=SafetyVariantConfig)
    # Evaluation on preference/eval.jsonl after training: pairs per forward, calibration plot bins.
    eval_batch: int = 16
    # Bins (equal counts, by score difference) of the eval's calibration table and plot.
    calibration_bins: int = 10
    combined: CombinedRewardConfig = field(default_factory=CombinedRewardConfig)


# Keys that change what is reported, not what is trained (components/core/runs.py fingerprint).
VOLATILE = (*TRAIN_VOLATILE, "eval_batch", "calibration_bins", "combined")
