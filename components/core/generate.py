"""Batched sampling with a KV cache: greedy, temperature, top-p, max new tokens, stop on EOS.

Shared by `kubellama generate`, rejection sampling, PPO rollouts and safety eval. Prompts of different lengths are
left-padded; padding is masked out of attention and RoPE positions start at each prompt's first real token.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from components.core.errors import KubellamaError
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


@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = 2, seed: int | None = None) -> list[list[int]]:
    """New tokens for each prompt, ending at (and including) EOS when one is sampled.

    Greedy decoding (temperature 0) gives a prompt the tokens it gets alone, whatever it is batched with (up to
    float rounding of near-ties). Sampling draws every row from one generator, so a prompt's sample depends on the
    batch; a seed reproduces the same batch, not the same prompt in another batch.

    Under torch.distributed with several ranks (an FSDP-sharded model), every rank calls this at once: each forward
    gathers parameters from all ranks, so a rank whose prompts have finished keeps stepping, its outputs frozen,
    until every rank is done. Ranks may pass different prompts and max_new_tokens.
    A prompt longer than the model's max_seq_len minus max_new_tokens is refused.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    steps = _steps(model, prompts, max_new_tokens, device)
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, device=device)
        valid[i, L - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.empty(model.cfg, B, L + steps, device, dtype)
    cache.valid[:, :L] = valid
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    logits = model(tokens, positions=positions, cache=cache)[:, -1]
    next_pos = valid.sum(-1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(steps):
        tok = sample(logits, temperature, top_p, generator)
        if step < max_new_tokens:
            for i in (~done).nonzero().flatten().tolist():
                out[i].append(int(tok[i]))
            if eos_id is not None:
                done |= tok == eos_id
        finished = bool(done.all()) or step >= max_new_tokens - 1
        # The same decision on every rank: `steps` is agreed and the flag is reduced, so the forwards line up.
        if step == steps - 1 or _everywhere(finished, device):
            break
        logits = model(tok[:, None], positions=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1
    return out
