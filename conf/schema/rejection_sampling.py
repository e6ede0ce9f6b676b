from dataclasses import dataclass, field

from kubellama.conf.schema.rlhf import RewardModelsConfig, SamplingConfig
from kubellama.conf.schema.sft import SFT_VOLATILE, SftTrainConfig


@dataclass
class RejectionSamplingConfig(SftTrainConfig):
    """Rejection sampling (paper §3.2.3): K samples per prompt, the best by the combined reward kept, the model
    fine-tuned on the best samples of this and every earlier round (the pool), with the SFT body."""

    # K answers per prompt; Figure 7 goes up to 100.
    samples: int = 10
    # §3.2.3: temperature 1.2-1.3 was best for 10-100 samples (Figure 8); top-p and length are not published.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.2, top_p=1.0,
                                                                            max_new_tokens=128))
    # Prompts of this round (0: every training prompt of the preference data).
    prompts: int = 0
    # The pool of best samples, persisting across rounds (runs): one JSONL per round. Empty: <run.root>/rs_pool.
    pool: str = ""
    # Share of the pool's prompts held out for the SFT body's held-out loss (by a stable hash of the prompt).
    eval_fraction: float = 0.1
    # The reward models and their combined reward (§3.2.3).
    reward_models: RewardModelsConfig = field(default_factory=RewardModelsConfig)
    # Scoring batch.
    score_batch: int = 16
    # How the two reward models are held: "bf16" shards, "offload" (bf16, CPU memory between forwards) or "fp32"
    # (see ppo.frozen).
    frozen: str = "bf16"
    # With data prep's world on: also train the init for as many steps (same lr, batch, schedule) on data prep's
    # plain SFT dialogs, under <output>/control, and report world.accuracy_control. Best-of-K's gain must beat the
    # same compute spent on plain SFT, or the sampling and scoring bought nothing. Doubles the fine-tuning cost.
    control: bool = True
    # A prompt whose every sample was cut at max_new_tokens adds nothing to the pool (SFT would train a cut answer
    # as a clean ending). True keeps its best cut answer instead: only for smoke runs of an untrained model, which
    # almost never samples EOS; the report counts them either way.
    allow_truncated: bool = False


RS_VOLATILE = (*SFT_VOLATILE, "score_batch", "control")
