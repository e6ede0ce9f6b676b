"""PPO's math as pure functions on padded (B, T) tensors of response tokens with a 0/1 `mask` (1 = a response
token): per-token KL (k1) to the reference, the §3.2.3 reward R = R̃_c − β·KL, GAE, whitening over all ranks, the
clipped policy and value losses and the entropy. Losses are sums over tokens; callers divide by the minibatch's
token count, so micro-batches add up to exactly the minibatch's mean.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kubellama.components.core.rlhf.scorer import PAD
from kubellama.components.core.train.dist import all_sum


def batch_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) right-padded prompt+response, mask (B, T-1) over target positions that are response tokens)."""
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in full)
    tokens = torch.full((len(full), T), PAD, dtype=torch.long, device=device)
    mask = torch.zeros(len(full), T - 1, device=device)
    for i, (p, s) in enumerate(zip(prompts, full)):
        tokens[i, :len(s)] = torch.tensor(s, device=device)
        mask[i, len(p) - 1:len(s) - 1] = 1.0
    return tokens, mask


def token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1: (B, T-1) fp32, under the distribution the rollouts
    sample from, softmax(logits / temperature) (verl's logprobs_from_logits after logits.div_(temperature)); a
    temperature of 0 (greedy) reads the logits at T = 1."""
    logp = torch.log_softmax(logits[:, :-1].float() / (temperature or 1.0), -1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_tokens(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 estimate of KL(π‖π_ref) per response token (0 off the response)."""
    return (logp - ref_logp) * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·kl_t, plus `score` (B,) on each row's last response token."""
    r = -beta * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last 1 in each row
    r[torch.arange(r.shape[0]), last] += score.to(r.dtype) * (mask.sum(-1) > 0)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both 0 off the response. Rows are right-padded: the response is a prefix of the mask
    after its first 1, so the value after a row's last token is 0."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (population std), 0 off the mask. Under torch.distributed the
    statistics are those of every rank's entries together (collective): each rank holds a slice of one batch, and
    per-rank statistics would scale one rank's advantages against another's."""
    n, total = all_sum([float(mask.sum()), float((x * mask).sum())], x.device)
    mean = total / max(n, 1.0)
    (sq,) = all_sum([float((((x - mean) * mask) ** 2).sum())], x.device)
    return (x - mean) * torch.rsqrt(torch.tensor(sq / max(n, 1.0) + eps, dtype=x.dtype, device=x.device)) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum, clipped-token count, approx-KL sum): −min(ρA, clip(ρ, 1±ε)A) per token, ρ = π/π_old. The
    approximate KL to the rollout policy is the k3 estimator (ρ − 1) − log ρ."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    loss = (-torch.minimum(unclipped, clipped) * mask).sum()
    clipped_n = (((ratio - 1.0).abs() > clip).float() * mask).sum()
    approx_kl = (((ratio - 1.0) - log_ratio) * mask).sum()
    return loss, clipped_n.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Sum over tokens of ½·max((V − R)², (clip(V, V_old ± c) − R)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (err * mask).sum()


def entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over response tokens of the sampling distribution's entropy (logits / temperature) at that position."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
    return (-(logp.exp() * logp).sum(-1) * mask).sum()
