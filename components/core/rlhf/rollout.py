"""Prompts and sampled answers, shared by the stages that sample from a policy and score the answers (PPO,
rejection sampling): the distinct prompts of a prompt set or a preference split, and generation at a
`SamplingConfig`, seeded per prompt so that answers do not depend on how prompts are dealt to ranks or batched."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubellama.components.core.data.pairs import read_pairs
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io.jsonl import read_lines
from kubellama.components.core.model.generate import generate
from kubellama.components.core.model.llama import Llama
from kubellama.conf.schema.rlhf import SamplingConfig


@dataclass
class Prompt:
    ids: list[int]
    safety: bool = False
    # The dialog the ids encode (ending with a user turn), when known.
    messages: list[dict[str, str]] | None = None
    # A world prompt's right answer and task family (data prep's `data.world`); None for other prompts.
    answer: str | None = None
    family: str | None = None


def prompt_room(max_seq_len: int, max_new_tokens: int) -> int:
    """The longest prompt kept: the context less the answer's length, never less than half of the context."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


def _prompt_set(url: str) -> tuple[list[dict[str, Any]], str] | None:
    """The records of a prompt set of data prep (prompts/{rs,ppo,eval}.jsonl: {"id", "prompt" or "messages",
    "safety", "source"}, a world prompt also "family" and "answer") as {"messages", "safety", "answer", "family"},
    and the file's sha256; None when `url` holds preference pairs."""
    lines, digest = read_lines(url, "no prompts (run data prep with data.prompts.sources for prompt sets, or "
                                    "data.preference.sources for preference pairs)")
    out = []
    for n, rec in lines:
        if not isinstance(rec, dict) or "chosen" in rec:
            return None  # preference pairs: read_pairs checks them
        messages = rec.get("messages") or ([{"role": "user", "content": rec["prompt"]}]
                                           if isinstance(rec.get("prompt"), str) else None)
        if not messages or not isinstance(rec.get("safety", False), bool):
            raise KubellamaError(f"{url}:{n}: not a prompt record of data prep (a 'prompt' or 'messages' and a "
                                 f"boolean 'safety')")
        out.append({"messages": messages, "safety": rec.get("safety", False), "answer": rec.get("answer"),
                    "family": rec.get("family")})
    return out, digest


def prompts_of(url: str, tok: Tokenizer, limit_tokens: int, count: int = 0,
               families: Sequence[str] = ()) -> tuple[list[Prompt], str, int]:
    """The distinct prompts of a prompt set (data prep's prompts/<split>.jsonl) or of a preference split (first
    occurrence order), as generation-ready ids, with their safety tag (and a world prompt's answer and family); the
    file's sha256; how many were dropped for leaving no room to answer. `families` keeps only the world prompts of
    those task families (empty: every prompt)."""
    found = _prompt_set(url)
    pairs, digest = found if found is not None else read_pairs(url)
    seen, out, dropped = set(), [], 0
    for rec in pairs:
        if families and rec.get("family") not in families:
            continue
        key = repr(rec["messages"])
        if key in seen:
            continue
        seen.add(key)
        ids = tok.encode_dialog_prompt(rec["messages"])
        if len(ids) > limit_tokens:
            dropped += 1
            continue
        out.append(Prompt(ids, bool(rec["safety"]), list(rec["messages"]), rec.get("answer"), rec.get("family")))
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
