"""Packing without cross-contamination: a packed row trains exactly like its examples run one by one, and the GPU
path attends through a FlexAttention block mask, never a dense T × T mask."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from kubellama.components.core.data.tokenizer import IGNORE
from kubellama.components.core.model import attention
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train.loss import sft_loss
from kubellama.conf.schema.model import ModelConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_attention.py"
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=97, max_seq_len=64)


def examples(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, labels) of three examples: a prompt without loss (BOS first) then an answer with loss."""
    rng = np.random.default_rng(seed)
    out = []
    for prompt, answer in ((5, 7), (9, 4), (3, 11)):
        tokens = np.concatenate([[1], rng.integers(3, CFG.vocab_size, prompt + answer - 1)])
        labels = np.where(np.arange(len(tokens)) < prompt, IGNORE, tokens)
        out.append((tokens, labels))
    return out


def packed_batch(exs: list[tuple[np.ndarray, np.ndarray]], pad: int) -> dict[str, torch.Tensor]:
    tokens = np.concatenate([t for t, _ in exs] + [np.full(pad, 2)])
    labels = np.concatenate([lab for _, lab in exs] + [np.full(pad, IGNORE)])
    segments = np.concatenate([np.full(len(t), i) for i, (t, _) in enumerate(exs)] + [np.full(pad, -1)])
    turns = np.where(segments >= 0, 0, -1)
    return {k: torch.from_numpy(v[None].astype(np.int64)) for k, v in
            dict(tokens=tokens, labels=labels, segments=segments, turns=turns).items()}


def one_by_one(model: Llama, exs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of each example's own loss, alone in its batch with the plain causal mask and positions 0.."""
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
    for tokens, labels in exs:
        t, lab = torch.from_numpy(tokens)[None], torch.from_numpy(labels)[None]
        logits = model(t[:, :-1])
        total = total + F.cross_entropy(logits.flatten(0, 1), lab[:, 1:].flatten(), ignore_index=IGNORE,
                                        reduction="sum")
        count = count + (lab[:, 1:] != IGNORE).sum()
    return total, count


def grads(model: Llama) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_packed_loss_and_gradients_equal_examples_one_by_one():
    torch.manual_seed(0)
    model = Llama(CFG).float()
    exs = examples()
    loss_fn = sft_loss("all")
    packed, n_packed = loss_fn(model, packed_batch(exs, pad=6))
    (packed / n_packed).backward()
    g_packed = grads(model)
    alone, n_alone = one_by_one(model, exs)
    (alone / n_alone).backward()
    g_alone = grads(model)
    assert int(n_packed) == int(n_alone) == sum(int((lab[1:] != IGNORE).sum()) for _, lab in exs)
    assert torch.allclose(packed / n_packed, alone / n_alone, rtol=0, atol=1e-5)
    for name in g_alone:
        assert torch.allclose(g_packed[name], g_alone[name], rtol=0, atol=1e-5), name
    # Without the document mask the same row would let examples see each other: the check above has teeth.
    leaky = model(packed_batch(exs, pad=6)["tokens"][:, :-1])
    masked = model(packed_batch(exs, pad=6)["tokens"][:, :-1],
                   segments=packed_batch(exs, pad=6)["segments"][:, :-1])
    assert not torch.allclose(leaky[0, 12:], masked[0, 12:], atol=1e-3)


def test_a_target_never_crosses_into_the_next_example():
    """Even with labels that claim the next example's first token, the loss stops at the example's end."""
    torch.manual_seed(1)
    model = Llama(CFG).float()
    exs = [(t, t.copy()) for t, _ in examples(3)]  # every token labelled, BOS included
    batch = packed_batch(exs, pad=2)
    loss, n = sft_loss("all")(model, batch)
    alone, n_alone = one_by_one(model, exs)
    assert int(n) == int(n_alone) and torch.allclose(loss, alone, rtol=0, atol=1e-4)


def test_loss_on_the_last_turn_only():
    torch.manual_seed(2)
    model = Llama(CFG).float()
    batch = packed_batch(examples(), pad=0)
    # The first example is a 2-turn dialog here: its tokens 0..7 are turn 1 (1 turn left), the rest turn 2.
    batch["turns"][0, :8] = 1
    _, n_all = sft_loss("all")(model, batch)
    _, n_last = sft_loss("last")(model, batch)
    labels = batch["labels"][0]
    assert int(n_all) - int(n_last) == int((labels[1:8] != IGNORE).sum()) > 0


class OnCuda(torch.Tensor):
    """CPU segments that report a CUDA device: what `document_mask` is handed on a GPU, without one."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


def test_gpu_path_builds_a_block_mask_not_a_dense_one(monkeypatch):
    # 512 tokens of three examples: 4 × 4 blocks of 128 tokens.
    segments = torch.tensor([[0] * 200 + [1] * 250 + [2] * 62])
    T = segments.shape[1]
    # What a CUDA batch gets by default: the block-mask builder, never the dense one (CPU: the dense one).
    monkeypatch.delenv(attention.MODE_ENV, raising=False)
    built: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(attention, "block_mask", lambda s: built.append("block"))
        m.setattr(attention, "dense_mask", lambda s: built.append("dense"))
        attention.document_mask(segments.as_subclass(OnCuda))
        assert built == ["block"]
        attention.document_mask(segments)
        assert built == ["block", "dense"]
    # What that builder returns: a BlockMask holding per-block indices only, no T × T tensor, that skips the blocks
    # no example's diagonal touches (a causal mask alone would compute blocks (2, 0) and (3, 0)).
    mask = attention.block_mask(segments)
    assert isinstance(mask, BlockMask) and tuple(mask.shape) == (1, 1, T, T) and mask.BLOCK_SIZE == (128, 128)
    assert all(t.numel() < T * T for t in mask.as_tuple() if isinstance(t, torch.Tensor))
    assert mask.to_dense()[0, 0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    # Its rule, evaluated token by token, is the dense mask's.
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(mask.mask_mod, 1, 1, T, T, device="cpu"), attention.dense_mask(segments))
    with pytest.raises(ValueError, match="KUBELLAMA_DOC_MASK"):
        attention.use_block_mask(torch.device("cpu"), "sparse")


def test_block_mask_forward_equals_dense_forward(monkeypatch):
    """The model's packed forward through FlexAttention (eager on CPU: forward only) equals the dense path."""
    torch.manual_seed(3)
    model = Llama(CFG).float().eval()
    batch = packed_batch(examples(), pad=6)
    tokens, segments = batch["tokens"][:, :-1], batch["segments"][:, :-1]
    from kubellama.components.core.train.loss import segment_positions

    positions = segment_positions(segments)
    with torch.no_grad():
        dense = model(tokens, positions=positions, segments=segments)
        monkeypatch.setenv(attention.MODE_ENV, "block")
        block = model(tokens, positions=positions, segments=segments)
    assert torch.allclose(dense, block, rtol=0, atol=1e-5)


def test_gpu_check_skips_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/gpu.sh runs the check for real")
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "attention check: skipped (no CUDA device)"


def test_fsdp_with_the_bf16_policy_passes_the_block_mask_through(monkeypatch):
    """What the GPU runs, forward only on CPU: an FSDP2-sharded model under the bf16 policy gets the BlockMask
    through its per-block hooks and scores a packed batch like the dense path."""
    from kubellama.components.core.train import dist
    from kubellama.components.core.train.loss import causal_lm_loss
    from kubellama.components.core.train.parallelize import shard
    from kubellama.conf.schema.train import TrainConfig

    env = dist.init()
    torch.manual_seed(4)
    model = shard(Llama(CFG), TrainConfig(mixed_precision="bf16"), env)
    batch = packed_batch(examples(), pad=6)
    with torch.no_grad():
        monkeypatch.setenv(attention.MODE_ENV, "block")
        block, n = causal_lm_loss(model, batch)
        monkeypatch.setenv(attention.MODE_ENV, "dense")
        dense, _ = causal_lm_loss(model, batch)
    assert torch.allclose(block / n, dense / n, rtol=1e-2)
