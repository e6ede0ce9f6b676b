"""What the SFT body reads and scores: epochs of packed rows in a seeded order per epoch, the answer-only loss of
packed rows, and the held-out loss.

Shards come from data prep (components/data_prep/chat.py): tokens with `labels` (IGNORE off the answers), `segments`
(example id per token, -1 on padding) and `turns` (assistant turns after this token's turn, 0 on the last).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from kubellama.components.core.train import dist
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.data.shards import ShardReader, read_manifest
from kubellama.components.core.train.trainer import IGNORE, LossFn, causal_lm_loss

LOSS_TURNS = ("all", "last")


class EpochReader:
    """The rows of a shard set, each epoch in its own seeded order, dealt to ranks as ShardReader deals them (blocks
    of `block` rows round-robin, so a global batch holds the same rows on any number of ranks).

    An epoch is `plan(rows_per_step)` whole global batches; the few rows of a partial last batch sit out that epoch
    (different ones each epoch, as the order changes). The reader's state is the epoch and this rank's position in
    it; the order of epoch e is a function of (seed, e), so a resumed run reads exactly the rows an uninterrupted
    run reads. `epoch` moves on as soon as the last batch of an epoch is handed out: that is how the reader says it
    wrapped.
    """

    def __init__(self, url: str, rank: int = 0, world_size: int = 1, block: int = 1, seed: int = 0,
                 verify: bool = True):
        # One rank's view of the whole set: random access to any row.
        self.shards = ShardReader(url, verify=verify)
        self.url, self.rank, self.world_size, self.block, self.seed = url, rank, world_size, block, seed
        self.seq_len = self.shards.seq_len
        self.total_rows = self.shards.total_rows
        self.manifest = self.shards.manifest
        self.epoch = 0
        self.position = 0
        self.epoch_rows = 0  # per rank, set by plan()
        self._order: tuple[int, np.ndarray] | None = None

    def plan(self, rows_per_step: int) -> int:
        """Fix an epoch to whole optimizer steps of `rows_per_step` rows per rank; returns the steps per epoch."""
        if rows_per_step % self.block:
            raise ValueError(f"rows per step {rows_per_step} is not a multiple of the block {self.block}")
        steps = self.total_rows // (rows_per_step * self.world_size)
        if steps == 0:
            raise ConfigError(f"{self.url} holds {self.total_rows} rows, fewer than one global batch of "
                              f"{rows_per_step * self.world_size} rows: lower global_batch_tokens or add data")
        self.epoch_rows = steps * rows_per_step
        return steps

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.total_rows))
        return self._order[1]

    def global_index(self, position: int) -> int:
        """The row at this rank's `position` in the current epoch."""
        block, j = divmod(position, self.block)
        return int(self.order(self.epoch)[(block * self.world_size + self.rank) * self.block + j])

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        if not self.epoch_rows:
            raise RuntimeError("EpochReader.plan() must fix the epoch length before reading")
        if self.position + rows > self.epoch_rows:
            raise KubellamaError(f"a batch of {rows} rows straddles the end of epoch {self.epoch} "
                                 f"({self.epoch_rows} rows per rank)")
        index = [self.global_index(self.position + i) for i in range(rows)]
        self.position += rows
        if self.position == self.epoch_rows:
            self.epoch, self.position = self.epoch + 1, 0
        parts = [self.shards.row(i) for i in index]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}")
        # Positions count rows per rank; on another world size keep the rows consumed in the epoch.
        consumed = int(state["position"]) * int(state.get("world_size", self.world_size))
        self.epoch, self.position = int(state["epoch"]), consumed // self.world_size


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


class Heldout:
    """Loss and perplexity of a model on a held-out shard set. Collective: every rank scores its share of rows and
    takes the same number of forward passes (FSDP gathers parameters in each), padding with rows that carry no
    loss."""

    def __init__(self, url: str, micro_batch: int, loss_fn: LossFn, env: dist.Env, max_rows: int = 0):
        rows = int(read_manifest(url)["rows"])
        self.rows = min(rows, max_rows) if max_rows > 0 else rows
        self.reader = ShardReader(url) if self.rows else None
        self.micro_batch, self.loss_fn, self.env = micro_batch, loss_fn, env

    def __call__(self, model: nn.Module) -> dict[str, float] | None:
        """{"loss", "ppl", "tokens"}; None when the held-out set is empty."""
        if self.reader is None:
            return None
        env, mb = self.env, self.micro_batch
        mine = list(range(env.rank, self.rows, env.world_size))
        batches = math.ceil(math.ceil(self.rows / env.world_size) / mb)
        was_training = model.training
        model.eval()
        loss_sum = count = 0.0
        with torch.no_grad():
            for b in range(batches):
                idx = mine[b * mb:(b + 1) * mb]
                parts = [self.reader.row(i) for i in idx]
                while len(parts) < mb:
                    filler = dict(self.reader.row(0))
                    filler["labels"] = np.full_like(filler["labels"], IGNORE)
                    parts.append(filler)
                batch = {k: torch.from_numpy(np.stack([p[k] for p in parts]).astype(np.int64)).to(env.device)
                         for k in parts[0]}
                loss, n = self.loss_fn(model, batch)
                loss_sum += float(loss)
                count += float(n)
        model.train(was_training)
        total, tokens = dist.all_sum([loss_sum, count], env.device)
        mean = total / max(tokens, 1.0)
        return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": int(tokens)}
