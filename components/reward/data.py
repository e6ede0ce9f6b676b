"""Reward model data: the paper's training mixes of the preference pairs (§3.2.2; core/data/pairs.py reads them) and
PairSource, the pairwise batch source: one pair per row (never split across ranks or micro-batches), shuffled per
epoch (seeded) and dealt to ranks like ShardReader, its position the whole state a checkpoint needs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.rlhf.scorer import PAD, encode
from kubellama.conf.schema.data import RATINGS
from kubellama.conf.schema.reward import KINDS

# The paper's share of the other kind in each RM's training mix (§3.2.2).
OTHER_FRACTION = {"helpfulness": 0.5, "safety": 0.1}


def other_fraction(kind: str, given: float | None) -> float:
    f = OTHER_FRACTION[kind] if given is None else given
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"reward.other_fraction={given}: expected a share in [0, 1)")
    return f


@dataclass
class Mix:
    """Indices into the training pairs, in file order, and what they are made of."""

    indices: list[int]
    own: int
    other: int
    other_available: int
    synthetic: int = 0
    ratings: dict[str, int] = field(default_factory=dict)


def mix(pairs: Sequence[dict[str, Any]], kind: str, fraction: float | None, seed: int) -> Mix:
    """The training mix of a `kind` RM: all pairs of its kind plus a seeded sample of the other kind making up
    `fraction` of the whole (capped by what there is)."""
    if kind not in KINDS:
        raise ConfigError(f"reward.kind={kind!r}: expected one of {', '.join(KINDS)}")
    f = other_fraction(kind, fraction)
    own = [i for i, p in enumerate(pairs) if p["safety"] == (kind == "safety")]
    others = [i for i, p in enumerate(pairs) if p["safety"] != (kind == "safety")]
    if not own:
        raise KubellamaError(f"no {kind} pairs to train the {kind} RM on (pairs are safety pairs when their prompt "
                             f"is safety-tagged: data.preference.sources[].safety, data.preference.synthetic_safety)")
    take = min(len(others), round(len(own) * f / (1.0 - f)))
    rng = np.random.default_rng(seed)
    picked: list[int] = rng.choice(len(others), size=take, replace=False).tolist() if take else []
    indices = sorted(own + [others[j] for j in picked])
    ratings = {r: sum(1 for i in indices if pairs[i]["rating"] == r) for r in RATINGS}
    return Mix(indices, len(own), take, len(others), sum(1 for i in indices if pairs[i]["synthetic"]), ratings)


def encode_pair(tok: Tokenizer, pair: dict[str, Any], max_len: int) -> tuple[list[int], list[int], int]:
    """(chosen ids, rejected ids, how many of the two were cut to max_len)."""
    chosen, cut_c = encode(tok, pair["messages"], pair["chosen"], max_len)
    rejected, cut_r = encode(tok, pair["messages"], pair["rejected"], max_len)
    return chosen, rejected, int(cut_c) + int(cut_r)


class PairSource:
    """One rank's training pairs as batches {tokens (B, 2, T), lengths (B, 2), rating (B,), safe (B, 2)}: side 0
    is the chosen response, side 1 the rejected one, T the longest sequence of the batch (right-padded), rating the
    index into RATINGS. Integer arrays only (the trainer turns every array into an int64 tensor)."""

    def __init__(self, pairs: Sequence[dict[str, Any]], tok: Tokenizer, seq_len: int, rank: int = 0,
                 world_size: int = 1, block: int = 1, seed: int = 0):
        self.pairs, self.tok, self.seq_len = pairs, tok, seq_len
        self.rank, self.world_size, self.block, self.seed = rank, world_size, max(1, block), seed
        self.rows_per_rank = len(pairs) // (world_size * self.block) * self.block
        if self.rows_per_rank == 0:
            raise KubellamaError(f"{len(pairs)} training pairs cannot feed {world_size} rank(s) in micro-batches of "
                                 f"{self.block}")
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return self._perm[1]

    def global_index(self, position: int) -> int:
        """The pair this rank reads at `position`: block k of rank r is block k·W + r of the epoch's order."""
        epoch, p = divmod(position, self.rows_per_rank)
        block, j = divmod(p, self.block)
        return int(self._order(epoch)[(block * self.world_size + self.rank) * self.block + j])

    def next_batch(self, rows: int) -> dict[str, np.ndarray]:
        picked = [self.pairs[self.global_index(self.position + i)] for i in range(rows)]
        self.position += rows
        seqs = [encode_pair(self.tok, p, self.seq_len)[:2] for p in picked]
        width = max(len(s) for pair in seqs for s in pair)
        tokens = np.full((rows, 2, width), PAD, dtype=np.int64)
        lengths = np.zeros((rows, 2), dtype=np.int64)
        for i, pair in enumerate(seqs):
            for side, ids in enumerate(pair):
                tokens[i, side, :len(ids)] = ids
                lengths[i, side] = len(ids)
        return {"tokens": tokens, "lengths": lengths,
                "rating": np.array([RATINGS.index(p["rating"]) for p in picked], dtype=np.int64),
                "safe": np.array([[p["chosen_safe"], p["rejected_safe"]] for p in picked], dtype=np.int64)}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Positions count pairs per rank; on another world size the number of pairs consumed overall is kept.
        self.position = int(state["position"]) * int(state.get("world_size", self.world_size)) // self.world_size
