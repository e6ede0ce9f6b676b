"""Epochs of a shard set: each epoch's rows in a seeded order, dealt to ranks as ShardReader deals them, with the
epoch and position as the resumable state (what the SFT body trains on)."""
from __future__ import annotations

from typing import Any

import numpy as np

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.errors import ConfigError, KubellamaError


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
