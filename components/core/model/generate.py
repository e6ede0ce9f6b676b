"""Batched sampling with a KV cache: greedy, temperature, top-p, max new tokens, stop on EOS.

Shared by `kubellama generate`, rejection sampling, PPO rollouts and safety eval. Prompts of different lengths are
left-padded; padding is masked out of attention and RoPE positions start at each prompt's first real token.

Sampling is seeded per prompt: each row draws its token at step t by inverse CDF at a uniform that is a counter-based
hash of (row seed, t), so a rollout does not depend on what it was batched with, nor on the device's RNG. One
uniform per row and step, computed up front: no per-vocabulary noise, and no generator state to carry.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.model.llama import KVCache, Llama

MASK32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A bijective 32-bit integer hash (Wellons' lowbias32): neighbouring inputs give unrelated outputs."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & MASK32
    x ^= x >> 15
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on an int64 tensor of values in [0, 2**32). Both products stay below 2**63, so int64 holds them
    exactly and the shifts (arithmetic in torch) only ever see non-negative values."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def derive_seed(*parts: int) -> int:
    """One 32-bit seed from any non-negative integers, e.g. (run seed, iteration, prompt index)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(len(seeds), steps) uniforms in (0, 1]: a counter-based hash of (row seed, step), so row i's draws are a
    function of its own seed only, on any device and in any batch."""
    rows = torch.tensor([_mix32(_mix32(s & MASK32) ^ ((s >> 32) & MASK32)) for s in seeds], dtype=torch.int64)
    step = _mix32_t(torch.arange(steps, dtype=torch.int64) + 0x9E3779B9)
    bits = _mix32_t(_mix32_t(rows[:, None] ^ step[None]) ^ rows[:, None])
    # 24 bits: exactly representable in fp32, and as fine as the fp32 CDF they index.
    return (((bits >> 8) + 1).float() * 2.0 ** -24).to(device)


# Probabilities in fixed point for the nucleus search and the CDF: integer sums are exact in any order, so every
# device (CUDA's scatter-add sums in any order), batch and kernel agrees on them. 2**36 keeps a CDF times a 24-bit
# uniform below 2**63; a token below 2**-36 (1.5e-11) is never drawn.
FIXED_BITS, U_BITS = 36, 24
# Digits of the nucleus search (`nucleus_floor`): the 31 bits of a non-negative fp32, high to low.
DIGITS = ((20, 11), (10, 10), (0, 10))


def nucleus_floor(probs: torch.Tensor, mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row of `probs` (B, V) fp32 with `mass` their fixed-point values (int64), the smallest probability in the
    top-p nucleus: the smallest prefix of the probabilities sorted high to low whose mass reaches top_p of the row's
    (ties at its edge all kept). (B, 1).

    A radix select, not a sort: a non-negative float's bits order like its value, so the floor is found a digit at a
    time, high to low, from the mass per digit value of the probabilities that share the digits found so far: three
    scatter-adds over the vocabulary instead of a full sort, the most expensive step of sampling.
    """
    bits = probs.view(torch.int32).long()
    B, device = probs.shape[0], probs.device
    need = (mass.sum(-1, keepdim=True).double() * top_p).ceil().long()
    prefix = torch.zeros(B, 1, dtype=torch.long, device=device)
    above = torch.zeros(B, 1, dtype=torch.long, device=device)  # mass certainly in the nucleus
    for shift, width in DIGITS:
        n = 1 << width
        # Slot 0: below the prefix; 1..n: the digit's values; n + 1: above the prefix (counted in `above`).
        slot = ((bits >> shift) - (prefix << width)).clamp_(-1, n).add_(1)
        per = torch.zeros(B, n + 2, dtype=torch.long, device=device).scatter_add_(1, slot, mass)[:, 1:n + 1]
        # Mass from each digit value up: the floor's digit is the highest whose tail reaches what is needed.
        tail = per.flip(-1).cumsum(-1).flip(-1) + above
        # Tail is non-increasing in the digit: counting its entries >= need is a binary search on its negation
        # (a reduction over the bins costs several times more on CPU).
        digit = (torch.searchsorted(tail.neg(), need.neg(), right=True) - 1).clamp_(min=0)
        above = torch.where(digit < n - 1, tail.gather(1, (digit + 1).clamp_(max=n - 1)), above)
        prefix = (prefix << width) | digit
    return prefix.int().view(torch.float32)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           u: torch.Tensor | torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` (B, vocab): argmax at temperature 0, else inverse-CDF sampling of
    softmax(logits / temperature), restricted to the top-p nucleus, at the uniforms `u` (B,) in (0, 1] (drawn from
    `u` when it is a Generator). Each row's token depends only on its own logits and uniform."""
    if temperature <= 0:
        return logits.argmax(-1)
    if not isinstance(u, torch.Tensor):
        u = 1.0 - torch.rand(logits.shape[0], generator=u, device=logits.device if u is None else u.device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    mass = (probs * 2.0 ** FIXED_BITS).long()
    if top_p < 1.0:
        mass = mass * (probs >= nucleus_floor(probs, mass, top_p))
    cdf = mass.cumsum(-1)
    # The first index whose CDF reaches ceil(u * total), in 1..total: always a token of positive mass (a token
    # outside the nucleus is a flat step of the CDF the search skips).
    scaled = (u.to(cdf.device)[:, None] * 2.0 ** U_BITS).long().clamp_(1, 1 << U_BITS)
    return torch.searchsorted(cdf, (scaled * cdf[:, -1:] + (1 << U_BITS) - 1) >> U_BITS).squeeze(-1)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _refusal(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> str | None:
    if not prompts:
        return "generate() needs at least one prompt"
    if any(len(p) == 0 for p in prompts):
        return "every prompt needs at least one token (BOS)"
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    limit = model.cfg.max_seq_len
    if len(prompts[i]) + max_new_tokens > limit:
        return (f"prompt {i} has {len(prompts[i])} tokens + max_new_tokens={max_new_tokens} = "
                f"{len(prompts[i]) + max_new_tokens}, beyond the model's max_seq_len={limit}")
    return None


def _steps(model: Llama, prompts: list[list[int]], max_new_tokens: int, device: torch.device) -> int:
    """Decoding steps every rank takes: the largest max_new_tokens of all ranks. Refusals are agreed first, so a
    rank with a bad request does not leave the others waiting in a collective."""
    refusal = _refusal(model, prompts, max_new_tokens)
    if not _distributed():
        if refusal:
            raise KubellamaError(refusal)
        return max_new_tokens
    agreed = torch.tensor([max_new_tokens, int(refusal is not None)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if refusal:
        raise KubellamaError(f"rank {dist.get_rank()}: {refusal}")
    if agreed[1]:
        raise KubellamaError(f"rank {dist.get_rank()}: generation refused on another rank (see its error)")
    return int(agreed[0])


def _everywhere(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank."""
    if not _distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t[0])


def _sharded(model: Llama) -> bool:
    """Whether the model's forwards are collectives (FSDP: parameters are DTensor shards gathered per forward)."""
    return _distributed() and any(isinstance(p, DTensor) for p in model.parameters())


def _row_seeds(batch: int, seeds: Sequence[int] | None, seed: int | None) -> list[int]:
    if seeds is not None:
        if len(seeds) != batch:
            raise KubellamaError(f"generate() got {len(seeds)} seeds for {batch} prompts: pass one per prompt")
        return [int(s) for s in seeds]
    if seed is not None:
        return [derive_seed(seed, i) for i in range(batch)]
    # Unseeded: from torch's global generator, so torch.manual_seed still reproduces a call.
    return torch.randint(0, 2**62, (batch,)).tolist()


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = 2, seed: int | None = None,
             seeds: Sequence[int] | None = None) -> list[list[int]]:
    """New tokens for each prompt, ending at (and including) EOS when one is sampled.

    Sampling is seeded per prompt: `seeds` gives one seed per prompt, and a prompt's tokens are then a function of
    (prompt, seed) alone, not of what it is batched with or where in the batch it sits (up to float rounding of
    near-ties in the logits, as for greedy decoding). `seed` alone seeds row i with (seed, i): the same batch
    reproduces. Neither: seeds come from torch's global generator.

    Under torch.distributed with an FSDP-sharded model, every rank calls this at once: each forward gathers
    parameters from all ranks, so a rank whose prompts have finished keeps stepping, its outputs frozen, until
    every rank is done. Ranks may pass different prompts and max_new_tokens. An unsharded model (a consolidated
    copy) steps on its own once the ranks have agreed that no request is refused.
    A prompt longer than the model's max_seq_len minus max_new_tokens is refused.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    steps = _steps(model, prompts, max_new_tokens, device)
    lockstep = _sharded(model)
    if not lockstep:
        steps = max_new_tokens
    B, L = len(prompts), max(len(p) for p in prompts)
    rows = _row_seeds(B, seeds, seed)
    tokens = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p)
        valid[i, L - len(p):] = True
    tokens, valid = tokens.to(device), valid.to(device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    # On CPU the cache is fp32 whatever the weights: its attention products are small and bandwidth-light, and
    # CPU SDPA runs them several times faster in fp32 than in bf16.
    cache = KVCache.empty(model.cfg, B, L + steps, device, torch.float32 if device.type == "cpu" else dtype)
    cache.valid[:, :L] = valid
    u = uniforms(rows, max_new_tokens, device) if temperature > 0 else None
    logits = model(tokens, positions=positions, cache=cache, last=True)[:, -1]
    next_pos = valid.sum(-1)[:, None]
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    # Tokens each row keeps: up to and including its first EOS.
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    tok, step = torch.zeros(B, dtype=torch.long, device=device), -1
    for step in range(steps):
        if step < max_new_tokens:
            tok = sample(logits, temperature, top_p, None if u is None else u[:, step])
            out[:, step] = tok
            if eos_id is not None:
                length = torch.where((tok == eos_id) & (length == max_new_tokens), step + 1, length)
        stop = step >= steps - 1
        if not stop and lockstep:
            # The same decision on every rank: `steps` is agreed and the flag is reduced, so the forwards line up.
            stop = _everywhere(step >= max_new_tokens - 1 or bool((length <= step + 1).all()), device)
        elif not stop and eos_id is not None:
            # A host sync per step only where EOS can end every row early.
            stop = bool((length <= step + 1).all())
        if stop:
            break
        logits = model(tok[:, None], positions=next_pos, cache=cache)[:, -1]
        next_pos = next_pos + 1
    # Only the first max_new_tokens steps sample (the rest keep an FSDP rank stepping with the others).
    n = min(step + 1, max_new_tokens)
    return [r[:k] for r, k in zip(out[:, :n].tolist(), length.clamp(max=n).tolist())]
