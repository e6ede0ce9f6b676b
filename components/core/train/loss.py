"""Training losses: each returns (loss summed over target tokens, target token count), so the trainer can take a
token-level mean over the whole global batch. Labels of -100 (tokenizer.IGNORE) carry no loss."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kubellama.components.core.data.tokenizer import IGNORE
from kubellama.components.core.errors import ConfigError

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
LOSS_TURNS = ("all", "last")


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """RoPE positions restarting at 0 where the example id changes: (B, T) -> (B, T)."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the target tokens: inputs row[:-1], targets row[1:] (or labels[1:])."""
    tokens = batch["tokens"]
    inputs = tokens[:, :-1]
    targets = batch["labels"][:, 1:] if "labels" in batch else tokens[:, 1:]
    segments = batch["segments"][:, :-1] if "segments" in batch else None
    positions = segment_positions(segments) if segments is not None else None
    loss = model(inputs, positions=positions, segments=segments, targets=targets)
    return loss, (targets != IGNORE).sum()


def sft_loss(loss_turns: str) -> LossFn:
    """Next-token loss summed over answer tokens of packed rows: every assistant turn, or only each dialog's last
    (`loss_turns`). No target crosses into the next example (its first token is never predicted from the previous
    example's last), whatever the labels say."""
    if loss_turns not in LOSS_TURNS:
        raise ConfigError(f"loss_turns={loss_turns!r}: expected one of {', '.join(LOSS_TURNS)}")

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels, segments = batch["labels"], batch["segments"]
        if loss_turns == "last":
            labels = labels.masked_fill(batch["turns"] != 0, IGNORE)
        starts = torch.zeros_like(labels, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        return causal_lm_loss(model, {**batch, "labels": labels.masked_fill(starts, IGNORE)})

    return loss
