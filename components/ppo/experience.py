"""PPO's experience phase: the policy's sampled answers scored by the reward, the reference and the critic, turned
into a `Rollout` (per-token advantages and returns) that the guards read and the update trains on."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kubellama.components.core.model.generate import derive_seed
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.rlhf.combined import Whitener
from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.core.rlhf.scorer import RewardModel
from kubellama.components.core.train import dist
from kubellama.components.ppo import algo
from kubellama.conf.schema.ppo import PpoConfig


class ValueModel(RewardModel):
    """The critic: the reward model's architecture with its scalar head read at every position, (B, T) fp32."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,  # type: ignore[override]
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        h = Llama.forward(self, tokens, positions=positions, segments=segments)
        # sum over the size-1 head axis: a new tensor, not a view FSDP's backward hook could lose to an in-place op
        return self.score(h).sum(-1).float()


@dataclass
class Rollout:
    """One iteration's experience on this rank: (B, T) tokens, (B, T-1) tensors over target positions, and the
    batch's means over all ranks (what the guards and the log read)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    # Means per sequence: unwhitened reward (logit R_c, less the missing-EOS penalty), whitened reward, KL to the
    # reference, response length, and the share of answers cut at max_new_tokens (no EOS).
    reward: float
    reward_whitened: float
    kl: float
    length: float
    truncated: float = 0.0


def rng(seed: int, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *salt))


def batch_slots(iteration: int, per_batch: int, env: dist.Env) -> list[int]:
    """The run-wide slots (k-th prompt drawn) of this rank's share of `iteration`'s batch, dealt round-robin."""
    return list(range(iteration * per_batch, (iteration + 1) * per_batch))[env.rank::env.world_size]


def draw_prompts(prompts: Sequence[Prompt], slots: Sequence[int], seed: int) -> list[Prompt]:
    """The prompts at `slots`: a seeded order per pass over the prompts."""
    n, orders = len(prompts), {}
    out = []
    for k in slots:
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=rng(seed, 1, epoch))
        out.append(prompts[int(orders[epoch][pos])])
    return out


@torch.no_grad()
def forward_all(policy: nn.Module, ref: nn.Module, value: nn.Module, tokens: torch.Tensor, micro_batch: int,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy logp, reference logp, values) over all rows, micro-batch by micro-batch; log-probs at the sampling
    temperature, for the reference too (its KL is between the two sampling distributions, as in verl)."""
    out: tuple[list, list, list] = ([], [], [])
    for i in range(0, tokens.shape[0], micro_batch):
        t = tokens[i:i + micro_batch]
        out[0].append(algo.token_logp(policy(t), t, temperature))
        out[1].append(algo.token_logp(ref(t), t, temperature))
        out[2].append(value(t)[:, :-1])
    return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]


def truncated(responses: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """(B,) fp64: 1 where an answer has no closing EOS (cut at max_new_tokens or the context), else 0."""
    return torch.tensor([0.0 if r and r[-1] == eos_id else 1.0 for r in responses], dtype=torch.float64)


def make_rollout(policy: nn.Module, ref: nn.Module, value: nn.Module, batch: Sequence[Prompt],
                 responses: list[list[int]], raw: torch.Tensor, whitener: Whitener, cfg: PpoConfig,
                 env: dist.Env, cut: torch.Tensor | None = None) -> Rollout:
    """Collective: the rollout of this rank's `batch` and its sampled `responses`, given their unwhitened reward
    and which answers were cut (`truncated`): those lose cfg.missing_eos_penalty before whitening."""
    cut = torch.zeros(len(responses), dtype=torch.float64) if cut is None else cut.double().cpu()
    raw = raw.double().cpu() - cfg.missing_eos_penalty * cut
    score = whitener(raw).float().to(env.device)
    tokens, mask = algo.batch_tensors([p.ids for p in batch], responses, env.device)
    policy.eval(), value.eval()
    logp, ref_logp, values = forward_all(policy, ref, value, tokens, cfg.micro_batch, cfg.sampling.temperature)
    kl = algo.kl_tokens(logp, ref_logp, mask)
    rewards = algo.token_rewards(score, kl, mask, cfg.beta)
    adv, returns = algo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    adv = algo.whiten(adv, mask)
    lengths = mask.sum(-1)
    stats = dist.all_sum([float(raw.sum()), float(score.sum()), float(kl.sum()), float(lengths.sum()),
                          float(len(batch)), float(cut.sum())], env.device)
    n = stats[4]
    return Rollout(tokens, mask, logp, values, adv, returns, reward=stats[0] / n, reward_whitened=stats[1] / n,
                   kl=stats[2] / n, length=stats[3] / n, truncated=stats[5] / n)
