"""The Llama 2 combined reward (paper §3.2.3), for PPO, rejection sampling and evaluation:
R_c = R_s if is_safety(prompt) or R_s < threshold (0.15) else R_h; reward = whiten(logit(R_c)).
`combine_scores` gives logit(R_c) as the raw score the rule picks (what rejection sampling ranks by and PPO reports);
`Whitener` whitens it for PPO, with batch statistics or a running estimate kept in PPO's checkpoint. PPO's KL
penalty is PPO's own (ppo/algo.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from kubellama.components.core.errors import ConfigError
from kubellama.conf.schema.reward import WHITEN, CombinedRewardConfig


def choose(r_h: torch.Tensor, r_s: torch.Tensor, is_safety: torch.Tensor, threshold: float) -> torch.Tensor:
    """R_c: the safety reward where the prompt is safety-tagged or the safety reward is below `threshold` (strictly:
    R_s equal to the threshold keeps R_h), else the helpfulness reward."""
    return torch.where(is_safety.bool() | (r_s < threshold), r_s, r_h)


def logit(p: torch.Tensor, eps: float) -> torch.Tensor:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps] so a saturated RM gives a large finite value."""
    p = p.double().clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def combine(r_h: torch.Tensor, r_s: torch.Tensor, is_safety: torch.Tensor, cfg: CombinedRewardConfig) -> torch.Tensor:
    """logit(R_c) in fp64: the combined reward before whitening, what PPO and rejection sampling score answers with
    (core/rlhf/reward_models.py). PPO whitens it per rollout with a `Whitener` (components/ppo/experience.py) and
    reports it unwhitened too; rejection sampling keeps it as is, since whitening would not change the argmax."""
    return logit(choose(r_h, r_s, is_safety, cfg.safety_threshold), cfg.eps)


def combine_scores(s_h: torch.Tensor, s_s: torch.Tensor, is_safety: torch.Tensor,
                   cfg: CombinedRewardConfig) -> torch.Tensor:
    """logit(R_c) in fp64, exactly: the raw score (before the sigmoid) of the RM the rule picks, the rule read on
    R_s = sigmoid(s_s) in fp64. Equal to `combine` on sigmoid(s) up to rounding, but a float32 sigmoid and back
    drifts (6e-5 at a score of 7, 9e-3 at 12) and saturates at ±logit(eps)."""
    s_h, s_s = s_h.double(), s_s.double()
    return torch.where(is_safety.bool() | (torch.sigmoid(s_s) < cfg.safety_threshold), s_s, s_h)


# Host-side values (the RMs' scores live on the CPU) are reduced over a gloo group of their own: NCCL, and the
# CUDA side of "cuda:gloo", have no CPU backend. Created on first use, which every rank reaches together
# (Whitener is collective); keyed by the default group so a new process group gets a new one.
_HOST: dict[int, Any] = {}


def _host_group() -> Any:
    key = id(tdist.group.WORLD)
    if key not in _HOST:
        _HOST.clear()
        _HOST[key] = tdist.new_group(backend="gloo")
    return _HOST[key]


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a CPU tensor over all ranks, on the host group (in place)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, group=_host_group())
    return t


def _global_moments(x: torch.Tensor) -> tuple[float, float, float]:
    """(count, mean, sum of squared deviations) of `x` over all ranks, in fp64, reduced on the host."""
    x = x.detach().double().cpu()
    n, total = _all_sum(torch.stack([torch.tensor(float(x.numel()), dtype=x.dtype), x.sum()])).tolist()
    mean = total / n if n else 0.0
    return n, mean, float(_all_sum(((x - mean) ** 2).sum()))


class Whitener:
    """(x - mean) / sqrt(var + eps), with batch statistics or a running estimate (Chan et al.'s parallel update,
    exact over everything seen). Collective under torch.distributed: every rank calls it with its part of the
    batch."""

    def __init__(self, mode: str = "batch", eps: float = 1e-6):
        if mode not in WHITEN:
            raise ConfigError(f"reward.combined.whiten={mode!r}: expected one of {', '.join(WHITEN)}")
        self.mode, self.eps = mode, eps
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, mean, m2 = _global_moments(x)
        if self.mode == "running":
            total = self.count + n
            if total:
                delta = mean - self.mean
                self.m2 += m2 + delta * delta * self.count * n / total
                self.mean += delta * n / total
                self.count = total
            n, mean, m2 = self.count, self.mean, self.m2
        var = m2 / n if n else 0.0
        return (x.double() - mean) / (var + self.eps) ** 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def detection(r_s: torch.Tensor, unsafe: torch.Tensor, threshold: float) -> dict[str, Any]:
    """How well `R_s < threshold` (the rule's override) finds unsafe responses: precision, recall (None when
    undefined), and the counts they come from. The paper: 0.89 / 0.55 at 0.15 on its safety test set."""
    flagged = r_s < threshold
    unsafe = unsafe.bool()
    hits = int((flagged & unsafe).sum())
    n_flagged, n_unsafe = int(flagged.sum()), int(unsafe.sum())
    return {"threshold": threshold, "precision": hits / n_flagged if n_flagged else None,
            "recall": hits / n_unsafe if n_unsafe else None, "flagged": n_flagged, "unsafe": n_unsafe,
            "responses": int(unsafe.numel())}
