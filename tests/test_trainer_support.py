"""Helpers shared by the trainer / pretrain / launch tests (no tests here): tiny configs, shard sets, rank spawning."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kubellama.components.core.data.shards import ShardWriter
from kubellama.components.core.train import dist
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig

SEQ = 17  # rows of 17 tokens: 16 inputs, 16 targets
VOCAB = 128

# Small enough that a step is milliseconds, shaped like the real thing (GQA, 2 blocks).
MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=VOCAB, max_seq_len=SEQ)

# The same as Hydra overrides, for the CLI and the stage. fp32 is pinned here and in train_cfg: the tests compare losses and weights exactly across runs, resumes and rank counts, which bf16
# compute (mixed_precision=auto on CPUs with native bf16) would round differently.
OVERRIDES = [f"model.{k}={v}" for k, v in MODEL.items()] + [
    "pretrain.warmup_steps=2", "pretrain.lr=3e-3", "pretrain.micro_batch=2", "pretrain.log_every=1",
    f"pretrain.global_batch_tokens={4 * SEQ}", "pretrain.mixed_precision=fp32",
]


def model_cfg() -> ModelConfig:
    return ModelConfig(**MODEL)


def train_cfg(**kw: Any) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=4, global_batch_tokens=4 * SEQ, micro_batch=2, seq_len=SEQ,
                ckpt_every=2, keep_last=2, log_every=1, mixed_precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def write_shards(url: str, rows: int = 64, seed: int = 0, **side: np.ndarray) -> str:
    fields = {k: "<i4" for k in side}
    w = ShardWriter(url, seq_len=SEQ, vocab_size=VOCAB, shard_rows=24, fields=fields)
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(rows, SEQ))
    w.add(tokens, **side)
    w.close()
    return url


def _entry(rank: int, world: int, init: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    env = dist.init(init_method=init, rank=rank, world_size=world)
    try:
        fn(env, *args)
    finally:
        dist.shutdown()


def spawn(fn: Callable, world: int, *args: Any) -> None:
    """Run fn(env, *args) on `world` CPU ranks (gloo, file:// rendezvous: faster to start than torchrun)."""
    fd, path = tempfile.mkstemp(prefix="kl-rdzv-")
    os.close(fd)
    os.remove(path)
    torch.multiprocessing.spawn(_entry, args=(world, f"file://{path}", fn, args), nprocs=world, join=True)
