"""The reward model's objective (paper §3.2.2, Tables 27 and 29).

Binary ranking loss with a rating margin, per pair:  L = -log σ(r(x, y_c) - r(x, y_r) - m(rating)).
Optional safety auxiliary loss: a binary cross-entropy on each response's safety label with σ(r) as the
probability of "safe", so unsafe responses get negative scores (σ(r) < 0.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubellama.components.core.errors import ConfigError

# Table 27, in the order of RATINGS: significantly better, better, slightly better, negligibly better or unsure.
MARGIN_TABLES = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0)}


def margins(name: str) -> torch.Tensor:
    if name not in MARGIN_TABLES:
        raise ConfigError(f"reward.margin={name!r}: expected one of {', '.join(MARGIN_TABLES)}")
    return torch.tensor(MARGIN_TABLES[name])


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """-log σ(chosen - rejected - margin) per pair (logsigmoid: no overflow for large differences)."""
    return -F.logsigmoid(chosen - rejected - margin)


def safety_aux_loss(scores: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(score) against the safety label (1 = safe), per response."""
    return F.binary_cross_entropy_with_logits(scores, safe.to(scores.dtype), reduction="none")


def pair_loss(margin: str, aux_weight: float = 0.0):  # type: ignore[no-untyped-def]
    """The trainer's loss function: (sum over the micro-batch's pairs, number of pairs), on batches of
    components/reward/data.PairSource. Chosen and rejected sequences go through one forward."""
    table = margins(margin)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"]
        B, _, T = tokens.shape
        scores = model(tokens.reshape(2 * B, T), batch["lengths"].reshape(2 * B)).view(B, 2)
        loss = ranking_loss(scores[:, 0], scores[:, 1], table.to(scores.device)[batch["rating"]])
        if aux_weight:
            loss = loss + aux_weight * safety_aux_loss(scores, batch["safe"]).mean(dim=1)
        return loss.sum(), torch.tensor(float(B), device=scores.device)

    return loss_fn
