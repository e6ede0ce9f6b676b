"""A tiny seeded PPO run for the tests (no tests here): random tiny policy, prompts of random tokens, and a reward
that prefers a known token. `python tests/ppo_tiny.py OUTPUT ITERATIONS [KILL_AT]` runs it in a process of its own
(KILL_AT: SIGKILL itself right after that iteration's checkpoint)."""
from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch
from test_trainer_support import MODEL, model_cfg

from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.ppo.loop import Ppo
from kubellama.conf.schema.ppo import PpoConfig
from kubellama.conf.schema.rlhf import SamplingConfig

GOOD = 7  # the token the reward prefers


def reward(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
           safety: Sequence[bool]) -> torch.Tensor:
    """The share of GOOD tokens in each response."""
    return torch.tensor([sum(t == GOOD for t in r) / max(1, len(r)) for r in responses], dtype=torch.float64)


def prompts(n: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    return [Prompt([1] + [rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randrange(2, 5))])
            for _ in range(n)]


def sampling(**kw: Any) -> SamplingConfig:
    return SamplingConfig(**{"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, **kw})


def ppo_cfg(**kw: Any) -> PpoConfig:
    """A tiny PpoConfig; temperature, top_p and max_new_tokens go to its `sampling`."""
    sample = {k: kw.pop(k) for k in ("temperature", "top_p", "max_new_tokens") if k in kw}
    base = dict(lr=3e-3, max_steps=6, prompts_per_batch=16, minibatch=8, micro_batch=4, sampling=sampling(**sample),
                beta=0.01, mixed_precision="fp32", ckpt_every=1, keep_last=0, eval_every=2, patience=0,
                heldout_prompts=4, kl_max=50.0, min_length_ratio=0.0)
    base.update(kw)
    return PpoConfig(**base)


def make(output: str, cfg: PpoConfig, **kw: Any) -> Ppo:
    return Ppo(cfg, model_cfg(), output, prompts(48, 0), prompts(4, 1), reward, eos_id=-1, seed=5, **kw)


def main(argv: list[str]) -> None:
    output, iterations = argv[0], int(argv[1])
    kill_at = int(argv[2]) if len(argv) > 2 else -1

    def hook(it: int) -> None:
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    ppo = make(output, ppo_cfg(max_steps=iterations), on_iteration=hook)
    ppo.fit()
    torch.save(ppo.full_state_dict(), os.path.join(output, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
