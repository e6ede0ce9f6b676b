"""The reward PPO and rejection sampling score answers with: the helpfulness and safety reward models of a stage's
`reward_models` section, read through `Scorer`, combined into logit(R_c) by `combine_scores` (paper §3.2.3)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.rlhf.combined import combine_scores
from kubellama.components.core.rlhf.scorer import Scorer
from kubellama.components.core.train import dist
from kubellama.conf.schema.reward import KINDS, CombinedRewardConfig

# reward_fn(prompts, responses, is_safety) -> unwhitened reward per row (CPU). Collective under torch.distributed.
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], Sequence[bool]], torch.Tensor]

def combined_reward(helpful: Scorer, safe: Scorer, cfg: CombinedRewardConfig) -> RewardFn:
    """reward(prompts, responses, is_safety) = logit(R_c) of each dialog: the raw score the rule picks
    (`combine_scores`), both RMs read at the dialog's last token: its closing EOS, or, for an answer cut at
    max_new_tokens, its last token as generated. No EOS is appended to a truncated answer (verl scores it as is):
    the answer is not complete, and the caller decides what a missing EOS costs (PPO's `missing_eos_penalty`)."""

    def reward(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               safety: Sequence[bool]) -> torch.Tensor:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        s_h = helpful.score_ids([s[-helpful.max_len:] for s in seqs])
        s_s = safe.score_ids([s[-safe.max_len:] for s in seqs])
        return combine_scores(s_h, s_s, torch.tensor(list(safety), dtype=torch.bool), cfg)

    return reward


def load_reward(section: Any, tok: Tokenizer, tok_url: str, env: dist.Env, batch_size: int, name: str) -> RewardFn:
    """Collective: the combined reward of the section's two reward models (`<name>.reward_models`), held as
    `<name>.frozen` says and sharded like the section's training. `name` is the section's config key, for errors."""
    models = section.reward_models
    for kind in KINDS:
        if not models[kind]:
            raise ConfigError(f"{name}.reward_models.{kind} is empty: give the URL of a reward stage's output (run "
                              f"with pipeline.stages.reward=true, or `kubellama reward reward={kind}`)")
    helpful, safe = (Scorer.load(models[kind], tokenizer=tok_url, train_cfg=section, env=env, batch_size=batch_size,
                                 frozen=section.frozen) for kind in KINDS)
    return combined_reward(helpful, safe, models.combined)
