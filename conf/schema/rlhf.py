"""Sub-configs shared by the stages that sample from a policy and score with the reward models (PPO, rejection
sampling): each stage holds its own copy, with its own paper defaults."""
from dataclasses import dataclass, field

from kubellama.conf.schema.reward import CombinedRewardConfig


@dataclass
class SamplingConfig:
    """How answers are sampled: temperature (0: greedy), nucleus top-p, response length."""

    # Sampling temperature (0: greedy).
    temperature: float = 1.0
    # Nucleus sampling: draw from the smallest token set whose probability reaches top_p.
    top_p: float = 1.0
    # Tokens generated at most per answer.
    max_new_tokens: int = 128


@dataclass
class RewardModelsConfig:
    """The two reward models (stage outputs, checkpoints or HF exports) and the rule combining their scores."""

    # The helpfulness RM (reward output, checkpoint or HF export); the pipeline wires this run's.
    helpfulness: str = ""
    # The safety RM (reward output, checkpoint or HF export); the pipeline wires this run's.
    safety: str = ""
    combined: CombinedRewardConfig = field(default_factory=CombinedRewardConfig)
