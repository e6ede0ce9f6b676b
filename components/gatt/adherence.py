"""Multi-turn generation and the instruction-adherence eval, in the spirit of the paper's Table 30: a checkable
instruction in the first user turn only, the model's own answers feeding the next turn, checked at the reported
turns; and its control, the same dialogs without the instruction checked by the same rule, so that a model which
always answers in capitals does not count as following "answer in capitals". Collective under torch.distributed
(ranks share the dialogs and generate together), so it works on an FSDP-sharded model.
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
from kubellama.components.core.world import stats
from kubellama.components.gatt.data import fit_turns, to_messages, with_instruction
from kubellama.components.gatt.families import Instruction, Values, make


@dataclass
class Probe:
    instruction: Instruction
    users: list[str]


def probes(prompts: Sequence[str], families: Sequence[str], values: Values, count: int, turns: int,
           seed: int) -> list[Probe]:
    """`count` dialogs of `turns` held-out prompts each, families in turn (all checkable), their instructions drawn
    from `values` (the held-out ones: families.values(p, heldout=True))."""
    rng = random.Random(seed)
    return [Probe(make(families[i % len(families)], rng, values), [rng.choice(list(prompts)) for _ in range(turns)])
            for i in range(count)]


def world_probes(dialogs: Sequence[Sequence[dict[str, Any]]], families: Sequence[str], values: Values, count: int,
                 turns: int, seed: int) -> list[Probe]:
    """One probe per held-out world dialog (at most `count`), its task prompts as the user turns (up to `turns`)."""
    rng = random.Random(seed)
    return [Probe(make(families[i % len(families)], rng, values), [r["prompt"] for r in list(d)[:turns]])
            for i, d in enumerate(list(dialogs)[:count])]


def _max_over_ranks(value: int) -> int:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=dist.control_group())
    return int(t.item())


def fit_prompt(tok: Tokenizer, system: str | None, users: Sequence[str], answers: Sequence[str],
               limit: int) -> tuple[list[int], int]:
    """Ids of the dialog so far, ending with the last user turn, at most `limit` tokens, and how many turns are in
    them. Middle turns go first; the first turn (it holds the instruction) is never dropped: when it and the last
    alone are too long, the tokens between the first turn's prompt and the last turn's end are cut (the first
    turn's prompt itself cut from its start, where the instruction is not, if it takes over half of `limit`)."""
    def ids(kept: list[int], answered: bool = True) -> list[int]:
        return tok.encode_dialog_prompt(to_messages(system, [users[i] for i in kept],
                                                    [answers[i] for i in kept if answered and i < len(answers)]))

    last = len(users) - 1
    kept = fit_turns(len(users), lambda k: len(ids(k)), limit)
    if kept is not None:
        return ids(kept), len(kept)
    if last == 0:
        # One turn too long: its end holds the instruction and the [/INST] the model answers after.
        return [tok.bos_id] + ids([0])[-(limit - 1):], 1
    head = ids([0], answered=False)
    half = limit // 2
    if len(head) > half:
        head = [tok.bos_id] + head[-(half - 1):]
    # Both turns are (partly) in the context.
    return head + ids([0, last])[-(limit - len(head)):], 2


def prompt_ids(tok: Tokenizer, system: str | None, users: Sequence[str], answers: Sequence[str],
               limit: int) -> list[int]:
    """fit_prompt's ids."""
    return fit_prompt(tok, system, users, answers, limit)[0]


def converse_counted(model: Llama, tok: Tokenizer, dialogs: Sequence[tuple[str | None, Sequence[str]]],
                     max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0) -> tuple[list[list[str]], list[list[int]]]:
    """The model's answers, turn by turn, to each (system, user turns) dialog, each answer part of the next turn's
    prompt; and the turns in its context when it gave each answer. Collective: every rank calls it with its own
    dialogs (maybe none)."""
    limit = model.cfg.max_seq_len - max_new_tokens
    turns = _max_over_ranks(max((len(u) for _, u in dialogs), default=0))
    answers: list[list[str]] = [[] for _ in dialogs]
    context: list[list[int]] = [[] for _ in dialogs]
    for t in range(turns):
        active = [i for i, (_, users) in enumerate(dialogs) if t < len(users)]
        fitted = [fit_prompt(tok, dialogs[i][0], dialogs[i][1][:t + 1], answers[i], limit) for i in active]
        # A rank without a dialog at this turn still steps with the others (FSDP gathers in every forward).
        outs = generate(model, [f[0] for f in fitted] or [[tok.bos_id]], max_new_tokens, temperature=temperature,
                        top_p=top_p, eos_id=tok.eos_id, seed=seed + t if temperature > 0 else None)
        for i, out, (_, n) in zip(active, outs, fitted):
            text = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
            answers[i].append(tok.decode(text).strip())
            context[i].append(n)
    return answers, context


def converse(model: Llama, tok: Tokenizer, dialogs: Sequence[tuple[str | None, Sequence[str]]],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
    """converse_counted's answers."""
    return converse_counted(model, tok, dialogs, max_new_tokens, temperature, top_p, seed)[0]


def _gather(items: list[dict[str, Any]], env: dist.Env) -> list[dict[str, Any]]:
    if env.world_size <= 1:
        return items
    gathered: list[Any] = [None] * env.world_size
    tdist.all_gather_object(gathered, items)
    return sorted((x for g in gathered for x in g), key=lambda x: x["i"])


def evaluate(model: torch.nn.Module, tok: Tokenizer, probes: Sequence[Probe], report_turns: Sequence[int],
             max_new_tokens: int, env: dist.Env, temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Share of answers that follow the first turn's instruction at each of `report_turns` (`by_turn`, and per
    family), the same share on the same dialogs without the instruction (`control_by_turn`), per-dialog `items`
    (whether each answer follows it with and without the instruction, turns in context) and a few transcripts.
    Collective."""
    idx = list(range(env.rank, len(probes), env.world_size))
    mine = [probes[i] for i in idx]
    was_training = model.training
    model.eval()
    runs = {}
    for arm, instructed in (("adherence", True), ("control", False)):
        users = [with_instruction(p.users, p.instruction, every_turn=False) if instructed else list(p.users)
                 for p in mine]
        runs[arm] = converse_counted(model, tok, [(None, u) for u in users],  # type: ignore[arg-type]
                                     max_new_tokens, temperature, seed=seed + 1000 * env.rank)
    model.train(was_training)
    items = []
    for j, (i, p) in enumerate(zip(idx, mine)):
        check = p.instruction.check
        assert check is not None
        item: dict[str, Any] = {"i": i, "family": p.instruction.family}
        for arm, (said, ctx) in runs.items():
            item[arm] = {str(t): bool(check(said[j][t - 1])) for t in report_turns if t <= len(said[j])}
            item[f"{arm}_context"] = {str(t): ctx[j][t - 1] for t in report_turns if t <= len(ctx[j])}
        items.append(item)
    examples = [{"instruction": p.instruction.text, "turns": {str(t): {"user": p.users[t - 1], "answer": a[t - 1]}
                                                              for t in report_turns if t <= len(a)}}
                for p, a in list(zip(mine, runs["adherence"][0]))[:2]]
    items = _gather(items, env)
    fams = sorted({p.instruction.family for p in probes})

    def share(arm: str, t: int, family: str | None = None) -> float | None:
        flags = [x[arm][str(t)] for x in items if str(t) in x[arm] and family in (None, x["family"])]
        return sum(flags) / len(flags) if flags else None

    return {
        "by_turn": {str(t): share("adherence", t) for t in report_turns},
        "control_by_turn": {str(t): share("control", t) for t in report_turns},
        "by_family": {f: {str(t): share("adherence", t, f) for t in report_turns} for f in fams},
        "dialogs": len(probes),
        "items": items,
        "examples": examples,
    }


def _turn(items: Sequence[dict[str, Any]], arm: str, t: int) -> list[dict[str, Any]]:
    return [x for x in items if str(t) in x[arm]]


def _context(items: Sequence[dict[str, Any]], arm: str, t: int) -> float | None:
    ctx = [x[f"{arm}_context"][str(t)] for x in _turn(items, arm, t)]
    return round(sum(ctx) / len(ctx), 3) if ctx else None


def _gaps(items: Sequence[dict[str, Any]], t: int) -> list[float]:
    """Per dialog, whether it followed the rule with the instruction minus without it (-1, 0 or 1)."""
    return [float(x["adherence"][str(t)]) - float(x["control"][str(t)])
            for x in items if str(t) in x["adherence"] and str(t) in x["control"]]


def figures(before: dict[str, Any], after: dict[str, Any], report_turns: Sequence[int]) -> dict[str, Any]:
    """The report's adherence figures from two `evaluate` results (init, output): for each turn N,
    `adherence_turn_N` and `control_turn_N` (Wilson intervals) with the mean turns in context when the model
    answered turn N (after's; `turns_in_context_detail` gives both), and `gap_turn_N`, adherence minus control
    (a percentile bootstrap over dialogs of the paired per-dialog difference)."""
    b, a = before["items"], after["items"]
    out: dict[str, Any] = {}
    for t in report_turns:
        for arm in ("adherence", "control"):
            detail = {"before": _context(b, arm, t), "after": _context(a, arm, t)}
            out[f"{arm}_turn_{t}"] = stats.before_after(
                stats.rate([x[arm][str(t)] for x in _turn(b, arm, t)]),
                stats.rate([x[arm][str(t)] for x in _turn(a, arm, t)]),
                turns_in_context=detail["after"], turns_in_context_detail=detail)
        out[f"gap_turn_{t}"] = stats.before_after(stats.mean(_gaps(b, t)), stats.mean(_gaps(a, t)),
                                                  method="paired bootstrap over dialogs")
    return out
