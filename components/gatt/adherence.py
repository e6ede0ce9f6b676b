"""Multi-turn generation and the instruction-adherence eval, in the spirit of the paper's Table 30: a checkable
instruction in the first user turn only, the model's own answers feeding the next turn, checked at the reported
turns. Collective under torch.distributed (ranks share the dialogs and generate together), so it works on an
FSDP-sharded model.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.model.generate import generate
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import dist
from kubellama.components.gatt.data import fit_turns, to_messages, with_instruction
from kubellama.components.gatt.families import Instruction, make


@dataclass
class Probe:
    instruction: Instruction
    users: list[str]


def probes(prompts: Sequence[str], families: Sequence[str], words: Sequence[str], count: int, turns: int,
           seed: int) -> list[Probe]:
    """`count` dialogs of `turns` held-out prompts each, families in turn (all checkable)."""
    rng = random.Random(seed)
    return [Probe(make(families[i % len(families)], rng, words), [rng.choice(list(prompts)) for _ in range(turns)])
            for i in range(count)]


def _max_over_ranks(value: int) -> int:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=dist.control_group())
    return int(t.item())


def prompt_ids(tok: Tokenizer, system: str | None, users: Sequence[str], answers: Sequence[str],
               limit: int) -> list[int]:
    """Ids of the dialog so far, ending with the last user turn, at most `limit` tokens (middle turns dropped)."""
    def ids(kept: list[int]) -> list[int]:
        return tok.encode_dialog_prompt(to_messages(system, [users[i] for i in kept],
                                                    [answers[i] for i in kept if i < len(answers)]))

    kept = fit_turns(len(users), lambda k: len(ids(k)), limit) or [len(users) - 1]
    out = ids(kept)
    return out if len(out) <= limit else [tok.bos_id] + out[-(limit - 1):]


def converse(model: Llama, tok: Tokenizer, dialogs: Sequence[tuple[str | None, Sequence[str]]],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
    """The model's answers, turn by turn, to each (system, user turns) dialog; each answer is part of the next
    turn's prompt. Collective: every rank calls it with its own dialogs (maybe none)."""
    limit = model.cfg.max_seq_len - max_new_tokens
    turns = _max_over_ranks(max((len(u) for _, u in dialogs), default=0))
    answers: list[list[str]] = [[] for _ in dialogs]
    for t in range(turns):
        active = [i for i, (_, users) in enumerate(dialogs) if t < len(users)]
        prompts = [prompt_ids(tok, dialogs[i][0], dialogs[i][1][:t + 1], answers[i], limit) for i in active]
        # A rank without a dialog at this turn still steps with the others (FSDP gathers in every forward).
        outs = generate(model, prompts or [[tok.bos_id]], max_new_tokens, temperature=temperature, top_p=top_p,
                        eos_id=tok.eos_id, seed=seed + t if temperature > 0 else None)
        for i, out in zip(active, outs):
            text = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
            answers[i].append(tok.decode(text).strip())
    return answers


def evaluate(model: torch.nn.Module, tok: Tokenizer, probes: Sequence[Probe], report_turns: Sequence[int],
             max_new_tokens: int, env: dist.Env, temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Share of answers that follow the first turn's instruction at each of `report_turns`: overall (`by_turn`)
    and per family, plus a few transcripts. Collective."""
    mine = list(probes)[env.rank::env.world_size]
    was_training = model.training
    model.eval()
    answers = converse(model, tok, [(None, with_instruction(p.users, p.instruction, every_turn=False)) for p in mine],
                       max_new_tokens, temperature, seed=seed + 1000 * env.rank)
    model.train(was_training)
    families = sorted({p.instruction.family for p in probes})
    keys = [(f, t) for f in families for t in report_turns]
    passes = {k: 0 for k in keys}
    totals = {k: 0 for k in keys}
    for p, said in zip(mine, answers):
        for t in report_turns:
            if t <= len(said):
                totals[(p.instruction.family, t)] += 1
                passes[(p.instruction.family, t)] += bool(p.instruction.check(said[t - 1]))  # type: ignore[misc]
    summed = dist.all_sum([float(passes[k]) for k in keys] + [float(totals[k]) for k in keys], env.device)
    got, n = dict(zip(keys, summed[:len(keys)])), dict(zip(keys, summed[len(keys):]))

    def rate(ks: list[tuple[str, int]]) -> float | None:
        count = sum(n[k] for k in ks)
        return sum(got[k] for k in ks) / count if count else None

    return {
        "by_turn": {str(t): rate([(f, t) for f in families]) for t in report_turns},
        "by_family": {f: {str(t): rate([(f, t)]) for t in report_turns} for f in families},
        "dialogs": len(probes),
        "examples": [{"instruction": p.instruction.text, "turns": {str(t): {"user": p.users[t - 1], "answer": a[t - 1]}
                                                                   for t in report_turns if t <= len(a)}}
                     for p, a in list(zip(mine, answers))[:2]],
    }
