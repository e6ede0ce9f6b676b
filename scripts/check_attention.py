"""GPU check of the packed document mask: `python scripts/check_attention.py --check` (skips without CUDA).

On a GPU, SFT's packed path must build a FlexAttention BlockMask (no dense T x T mask) whose forward+backward matches
the dense mask, alone and through an FSDP2 model under the bf16 policy; prints both times and the ratio.
Lives outside core because it drives the trainer (train) over the model (model sits below train).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from kubellama.components.core.model.attention import MODE_ENV, Mask, attend, dense_mask, document_mask
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import dist
from kubellama.components.core.train.loss import causal_lm_loss
from kubellama.components.core.train.parallelize import shard
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig


def segments(T: int, docs: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """One row of `docs` examples of random lengths summing to T."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=g)[:docs - 1].add(1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].to(device)


def timed(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up (compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / rounds


def model_check(tokens: int, docs: int, device: torch.device) -> tuple[str, float]:
    """The training path as SFT runs it: an FSDP2 model with the bf16 policy, GQA, a packed row of `tokens` inputs
    (4095 for 4096-token rows), loss and gradients through the block mask and through the dense mask. Returns the
    mask type the model built and the relative gap of their gradient norms."""
    env = dist.init()
    cfg = ModelConfig(name="check", dim=512, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden=1376, vocab_size=32000,
                      max_seq_len=tokens + 1)
    torch.manual_seed(0)
    model = shard(Llama(cfg), TrainConfig(mixed_precision="bf16"), env)
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(3, cfg.vocab_size, (1, tokens + 1), generator=g).to(device),
             "segments": segments(tokens + 1, docs, device)}
    built = type(document_mask(batch["segments"][:, :-1])).__name__
    norms = {}
    saved = os.environ.get(MODE_ENV)
    try:
        for mode in ("block", "dense"):
            os.environ[MODE_ENV] = mode
            loss, n = causal_lm_loss(model, batch)
            (loss / n).backward()
            norms[mode] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).full_tensor())
            model.zero_grad(set_to_none=True)
    finally:
        os.environ.pop(MODE_ENV) if saved is None else os.environ.__setitem__(MODE_ENV, saved)
    return built, abs(norms["block"] - norms["dense"]) / max(norms["dense"], 1e-12)


def check(tokens: int = 4096, heads: int = 32, head_dim: int = 128, docs: int = 8, rounds: int = 10) -> int:
    """On a GPU: the packed path builds a BlockMask (no dense mask) and its forward+backward matches the dense mask;
    prints both times. Without a GPU: prints a skip line and returns 0."""
    if not torch.cuda.is_available():
        print("attention check: skipped (no CUDA device)")
        return 0
    device = torch.device("cuda")
    seg = segments(tokens, docs, device)
    mask = document_mask(seg)
    if not isinstance(mask, BlockMask):
        print(f"attention check: FAILED, the GPU path built a {type(mask).__name__}, not a BlockMask")
        return 1
    dense = dense_mask(seg)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))

    def run(m: Mask) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, m, False)
        out.float().square().mean().backward()
        assert q.grad is not None
        return out.detach(), q.grad.detach()

    (o_block, g_block), (o_dense, g_dense) = run(mask), run(dense)
    err = max((o_block - o_dense).abs().max().item(), (g_block - g_dense).abs().max().item())
    t_block = timed(lambda: run(document_mask(seg)), rounds)
    t_dense = timed(lambda: run(dense_mask(seg)), rounds)
    built, gap = model_check(tokens - 1, docs, device)
    ok = err < 5e-2 and built == "BlockMask" and gap < 2e-2
    print(f"attention check: {torch.cuda.get_device_name(0)}, {tokens} tokens, {docs} documents, {heads} heads × "
          f"{head_dim}, bf16 forward+backward")
    print(f"  block mask (FlexAttention, mask built per call): {t_block * 1e3:.2f} ms; dense mask (SDPA): "
          f"{t_dense * 1e3:.2f} ms; max |difference| {err:.3g}")
    print(f"  model path (FSDP2, bf16 policy, GQA, {tokens - 1} inputs): built a {built}; gradient norm gap "
          f"block vs dense {gap:.2e}; {'ok' if ok else 'FAILED'}")
    print(f"ratio {t_dense / t_block:.2f} (target >= 1.00)")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/check_attention.py", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare the block-mask and dense paths on the GPU")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8)
    args = p.parse_args(argv)
    if not args.check:
        p.print_help()
        return 0
    return check(tokens=args.tokens, docs=args.docs)


if __name__ == "__main__":
    sys.exit(main())
