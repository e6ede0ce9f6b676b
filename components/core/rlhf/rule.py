"""The rule reward: 1.0 when the rule-checked world's rule (core/world/rules.correct) accepts an answer to a world
prompt, else 0.0. For small-scale checks of the learning dynamics (issue 21, item 5), where the reward models'
noise would hide whether PPO learns at all; `ppo.reward=rule` uses it instead of the combined reward."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.rlhf.reward_models import RewardFn
from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.core.world import rules


def answers(prompts: Sequence[Prompt], where: str) -> dict[tuple[int, ...], str]:
    """Each prompt's ids -> its right answer; a prompt without one is an error naming `where` (its file)."""
    out = {}
    for p in prompts:
        if p.answer is None:
            text = (p.messages or [{}])[-1].get("content", "")
            raise KubellamaError(f"{where}: prompt {text[:60]!r} has no 'answer': the rule reward (ppo.reward=rule) "
                                 f"needs the world's prompts (data.world.enabled=true; ppo.families to pick them)")
        out[tuple(p.ids)] = p.answer
    return out


def rule_reward(known: dict[tuple[int, ...], str], tok: Tokenizer) -> RewardFn:
    """reward(prompts, responses, is_safety): 1.0 where the answer (decoded up to its EOS) is the prompt's right
    answer by the rule, else 0.0 (float64, CPU). An answer holding a token of the model's padded vocabulary, which no
    text has, is wrong. Local: no collective."""

    def reward(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               safety: Sequence[bool]) -> torch.Tensor:
        out = []
        for p, r in zip(prompts, responses):
            answer = known.get(tuple(p))
            if answer is None:
                raise KubellamaError("rule reward: a prompt that is not one of the run's world prompts")
            body = list(r[:r.index(tok.eos_id)] if tok.eos_id in r else r)
            ok = all(0 <= t < tok.vocab_size for t in body) and rules.correct(answer, tok.decode(body))
            out.append(1.0 if ok else 0.0)
        return torch.tensor(out, dtype=torch.float64)

    return reward
