"""Prompts and sampled answers, shared by the stages that sample from a policy and score the answers (PPO,
rejection sampling): the distinct prompts of a preference split, and generation at a `SamplingConfig`, seeded per
prompt so that answers do not depend on how prompts are dealt to ranks or batched."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubellama.components.core.data.pairs import read_pairs
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.model.generate import generate
from kubellama.components.core.model.llama import Llama
from kubellama.conf.schema.rlhf import SamplingConfig


@dataclass
class Prompt:
    ids: list[int]
    safety: bool = False
    # The dialog the ids encode (ending with a user turn), when known.
    messages: list[dict[str, str]] | None = None


def prompt_room(max_seq_len: int, max_new_tokens: int) -> int:
    """The longest prompt kept: the context less the answer's length, never less than half of the context."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


def prompts_of(url: str, tok: Tokenizer, limit_tokens: int, count: int = 0) -> tuple[list[Prompt], str, int]:
    """The distinct prompts of a preference split (first occurrence order), as generation-ready ids, with their
    safety tag; the file's sha256; how many were dropped for leaving no room to answer."""
    pairs, digest = read_pairs(url)
    seen, out, dropped = set(), [], 0
    for rec in pairs:
        key = repr(rec["messages"])
        if key in seen:
            continue
        seen.add(key)
        ids = tok.encode_dialog_prompt(rec["messages"])
        if len(ids) > limit_tokens:
            dropped += 1
            continue
        out.append(Prompt(ids, bool(rec["safety"]), list(rec["messages"])))
        if count and len(out) >= count:
            break
    return out, digest, dropped


def sample_answers(model: Llama, prompts: list[list[int]], cfg: SamplingConfig, eos_id: int, seeds: Sequence[int],
                   temperature: float | None = None, chunk: int = 0) -> list[list[int]]:
    """Answers at the config's temperature (or `temperature`: 0 is greedy) and top-p, one seed per prompt
    (`derive_seed` of what identifies the prompt in the run, never the rank). `chunk` > 0 generates that many
    prompts at a time, which bounds the KV cache; with seeds per prompt the answers are the same. Under
    torch.distributed every rank must make the same number of calls (each agrees its step count with the others)."""
    limit = model.cfg.max_seq_len - max(len(p) for p in prompts)
    temperature = cfg.temperature if temperature is None else temperature
    size = chunk if chunk > 0 else len(prompts)
    out: list[list[int]] = []
    for i in range(0, len(prompts), size):
        out += generate(model, prompts[i:i + size], max(1, min(cfg.max_new_tokens, limit)), temperature=temperature,
                        top_p=cfg.top_p, eos_id=eos_id, seeds=seeds[i:i + size])
    return out
