"""PPO's update phase (one pass of minibatches over a `Rollout`, one gradient step each, for the policy and the
critic) and the guards that read a rollout's statistics before its update is applied."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.train import dist
from kubellama.components.ppo import algo
from kubellama.components.ppo.experience import Rollout, rng
from kubellama.conf.schema.ppo import PpoConfig


class GuardStop(KubellamaError):
    pass


def minibatch_tokens(mask: torch.Tensor, env: dist.Env) -> float:
    """Collective: the response tokens of a minibatch over all ranks, divided by the world size. Each rank divides
    its loss sums by it, so FSDP's mean of the ranks' gradients is the gradient of the minibatch's mean over all of
    its tokens, whatever each rank's share of them."""
    (total,) = dist.all_sum([float(mask.sum())], env.device)
    return max(total, 1.0) / env.world_size


def update(policy: nn.Module, value: nn.Module, opt_policy: torch.optim.Optimizer, opt_value: torch.optim.Optimizer,
           roll: Rollout, iteration: int, lr: float, seed: int, cfg: PpoConfig, env: dist.Env) -> dict[str, float]:
    """Collective: one pass over `roll` in minibatches (cfg.minibatch rows over all ranks), micro-batch by
    micro-batch; the losses' means over the pass. `lr` is the policy's; the critic's is cfg.critic_lr on the same
    schedule. GuardStop on a non-finite gradient norm, before its step."""
    policy.train(), value.train()
    for opt, peak in ((opt_policy, lr), (opt_value, lr * cfg.critic_lr / cfg.lr if cfg.lr else cfg.critic_lr)):
        for g in opt.param_groups:
            g["lr"] = peak
    temperature = cfg.sampling.temperature
    rows = roll.tokens.shape[0]
    order = torch.randperm(rows, generator=rng(seed, 3, iteration, env.rank))
    per = cfg.minibatch // env.world_size
    sums = np.zeros(6)  # policy loss, value loss, entropy, clipped, approx kl, tokens
    for start in range(0, rows, per):
        idx = order[start:start + per]
        count = minibatch_tokens(roll.mask[idx], env)
        for m in range(0, len(idx), cfg.micro_batch):
            j = idx[m:m + cfg.micro_batch]
            t, mask = roll.tokens[j], roll.mask[j]
            logits = policy(t)
            logp = algo.token_logp(logits, t, temperature)
            pl, clipped, akl = algo.policy_loss(logp, roll.logp[j], roll.advantages[j], mask, cfg.clip)
            vl = algo.value_loss(value(t)[:, :-1], roll.values[j], roll.returns[j], mask, cfg.value_clip)
            ent = algo.entropy(logits[:, :-1], mask, temperature)
            # The critic has an optimizer of its own: its loss needs no weight against the policy's.
            ((pl + vl - cfg.entropy_coef * ent) / count).backward()
            sums += [float(x.detach()) for x in (pl, vl, ent, clipped, akl, mask.sum())]
        norms = []
        for model in (policy, value):
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                  cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        if not all(math.isfinite(x) for x in norms):
            raise GuardStop(f"non-finite gradient norm at iteration {iteration + 1}")
        for opt in (opt_policy, opt_value):
            opt.step()
            opt.zero_grad(set_to_none=True)
    tot = dist.all_sum(sums.tolist(), env.device)
    n = max(tot[5], 1.0)
    return {"policy_loss": tot[0] / n, "value_loss": tot[1] / n, "entropy": tot[2] / n,
            "clip_fraction": tot[3] / n, "approx_kl": tot[4] / n}


class Tracker:
    """What the guards and early stopping remember across iterations (saved with each checkpoint): the first
    rollout's mean length, the best rollout reward, the best held-out reward, its iteration and evaluations since
    it, and the init's share of empty greedy answers."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"best": None, "bad": 0, "first_length": None}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)

    def guard(self, roll: Rollout, cfg: PpoConfig) -> str | None:
        """Why to stop before applying this rollout's update, or None (the first rollout sets the length)."""
        if self.state["first_length"] is None:
            self.state["first_length"] = roll.length
        if not all(math.isfinite(v) for v in (roll.reward, roll.kl, roll.length)):
            return "non_finite"
        if roll.kl > cfg.kl_max:
            return "kl_explosion"
        first = self.state["first_length"]
        if first and roll.length < cfg.min_length_ratio * first:
            return "length_collapse"
        best = self.state.get("best_reward")
        if best is not None and roll.reward < best - cfg.max_reward_drop:
            return "reward_collapse"
        return None

    def applied(self, roll: Rollout) -> None:
        """An update of `roll` went through: its reward counts towards the best."""
        best = self.state.get("best_reward")
        self.state["best_reward"] = roll.reward if best is None else max(best, roll.reward)

    def heldout(self, record: dict[str, Any], cfg: PpoConfig) -> tuple[str | None, str]:
        """Record a held-out evaluation ({"iteration", "heldout_reward", "empty_rate"}): (why to stop or None, the
        reason's detail for the stop message). "empty_answers" when more greedy answers are empty than
        cfg.max_empty_rate and than at the first evaluation (the init's); "heldout_plateau" after `patience`
        evaluations without a new best. The best's iteration is what an early stop exports."""
        score, empty = record["heldout_reward"], record.get("empty_rate", 0.0)
        if self.state.get("first_empty") is None:
            self.state["first_empty"] = empty
        best = self.state["best"]
        if best is None or score > best:
            self.state.update(best=score, bad=0, best_iteration=record["iteration"])
        else:
            self.state["bad"] += 1
        limit = max(cfg.max_empty_rate, self.state["first_empty"])
        if empty > limit:
            return "empty_answers", f"{empty:.0%} of greedy held-out answers are empty, above {limit:.0%}"
        if cfg.patience and self.state["bad"] >= cfg.patience:
            return "heldout_plateau", f"{self.state['bad']} held-out evaluations without a new best"
        return None, ""

    @property
    def best_iteration(self) -> int | None:
        return self.state.get("best_iteration")
