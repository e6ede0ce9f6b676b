"""Batched sampling with a KV cache: greedy, temperature, top-p, max new tokens, stop on EOS.

Shared by `kubellama generate`, rejection sampling, PPO rollouts and safety eval. Prompts of different lengths are
left-padded; padding is masked out of attention and RoPE positions start at each prompt's first real token, so a
prompt's output does not depend on what it is batched with.
"""
from __future__ import annotations

import torch

from components.core.model import KVCache, Llama


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of `logits` (B, vocab)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = 2, seed: int | None = None) -> list[list[int]]:
    """New tokens for each prompt, ending at (and including) EOS when one is sampled."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, device=device)
        valid[i, L - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.empty(model.cfg, B, L + max_new_tokens, device, dtype)
    cache.valid[:, :L] = valid
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    logits = model(tokens, positions=positions, cache=cache)[:, -1]
    next_pos = valid.sum(-1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(tok[i]))
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(tok[:, None], positions=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1
    return out
