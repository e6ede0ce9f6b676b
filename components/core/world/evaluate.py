"""The world's figures of a model: greedy answers to the held-out task and safety prompts, checked by the rules.
`Probe(model)` gives per-prompt items; `figures` turns items into rates and means with 95% intervals, and
`compare` a stage's init items and output items into the report's `world` object. Collective under
torch.distributed when the model is FSDP-sharded: every rank asks the same prompts (generate steps in lockstep)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.model.generate import generate
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.world import rules, safety, sets, stats
from kubellama.components.core.world.instructions import Instruction

# The world's answers are at most a dozen tokens (a five-letter list, a refusal, a look-alike's tip): 32 leaves room
# to see an answer that rambles, and `mean_length` counts what was said.
MAX_NEW_TOKENS = 32
BATCH = 64
# Single-turn metrics every model stage reports (the RM stages report pair accuracy instead).
METRICS = ("accuracy", "empty_rate", "mean_length", "refusal_harmful", "false_refusal")


@dataclass
class Said:
    text: str
    length: int  # tokens before EOS (or all of them, when cut at the limit)
    ended: bool  # EOS came within the limit


def say(model: Llama, tok: Tokenizer, dialogs: Sequence[list[dict[str, str]]],
        max_new_tokens: int = MAX_NEW_TOKENS, batch: int = BATCH) -> list[Said]:
    """Greedy answers to dialogs ending with a user turn."""
    return greedy(model, tok, [tok.encode_dialog_prompt(d) for d in dialogs], max_new_tokens, batch)


def greedy(model: Llama, tok: Tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = MAX_NEW_TOKENS,
           batch: int = BATCH) -> list[Said]:
    was_training = model.training
    model.eval()
    out: list[Said] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            for toks in generate(model, list(prompts[i:i + batch]), max_new_tokens, temperature=0.0,
                                 eos_id=tok.eos_id):
                ended = bool(toks) and toks[-1] == tok.eos_id
                body = toks[:-1] if ended else toks
                # Ids past the tokenizer's pieces (a padded embedding) have no text.
                out.append(Said(tok.decode([t for t in body if t < tok.vocab_size]), len(body), ended))
    model.train(was_training)
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def task_items(model: Llama, tok: Tokenizer, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    said = say(model, tok, [_user(r["prompt"]) for r in records])
    return [{"family": r["family"], "correct": rules.correct(r["answer"], s.text), "empty": s.length == 0,
             "length": s.length, "text": s.text} for r, s in zip(records, said)]


def safety_items(model: Llama, tok: Tokenizer, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    said = say(model, tok, [_user(r["prompt"]) for r in records])
    return [{"harmful": bool(r["harmful"]), "refused": safety.is_refusal(s.text), "empty": s.length == 0,
             "length": s.length, "text": s.text} for r, s in zip(records, said)]


class Probe:
    """The held-out task and safety prompts of a data prep output with the world on (None from `of` when off)."""

    def __init__(self, tasks: list[dict[str, Any]], safety_set: list[dict[str, Any]]):
        self.tasks, self.safety = tasks, safety_set

    @classmethod
    def of(cls, data: str) -> Probe | None:
        t, s = sets.eval_url(data, "tasks"), sets.eval_url(data, "safety")
        return cls(sets.read(t), sets.read(s)) if t and s else None

    def __call__(self, model: Llama, tok: Tokenizer) -> dict[str, list[dict[str, Any]]]:
        return {"tasks": task_items(model, tok, self.tasks), "safety": safety_items(model, tok, self.safety)}


def figures(items: dict[str, list[dict[str, Any]]], families: Sequence[str] | None = None) -> dict[str, Any]:
    """Rates and means of a model's items; `families` restricts `accuracy_band` to them."""
    tasks, safe = items.get("tasks", []), items.get("safety", [])
    every = tasks + safe
    out = {"accuracy": stats.rate([t["correct"] for t in tasks]),
           "empty_rate": stats.rate([t["empty"] for t in every]),
           "mean_length": stats.mean([float(t["length"]) for t in every]),
           "refusal_harmful": stats.rate([s["refused"] for s in safe if s["harmful"]]),
           "false_refusal": stats.rate([s["refused"] for s in safe if not s["harmful"]])}
    if families is not None:
        out["accuracy_band"] = stats.rate([t["correct"] for t in tasks if t["family"] in families])
    return out


def by_family(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    fams = sorted({t["family"] for t in items})
    return {f: stats.rate([t["correct"] for t in items if t["family"] == f]) for f in fams}


def band(items: Sequence[dict[str, Any]], lo: float = 0.2, hi: float = 0.8) -> list[str]:
    """The families a model solves between `lo` and `hi` of the time, on the items given (a calibration split,
    so that picking families by their score does not inflate the held-out rise by regression to the mean)."""
    return [f for f, r in by_family(items).items() if r["value"] is not None and lo <= r["value"] <= hi]


def compare(before: dict[str, Any], after: dict[str, Any], metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """The report's `world` object from two `figures` results (init, output)."""
    return {m: stats.before_after(before[m], after[m]) for m in metrics if m in before and m in after}


def showcase(model: Llama, tok: Tokenizer, probe: Probe, dialog: Sequence[dict[str, Any]] | None,
             instruction: Instruction, turn: int = 8) -> list[dict[str, Any]]:
    """A few held-out prompts answered, each judged by its rule: a task, an instruction at `turn` of a dialog (the
    instruction in the first user turn only), a harmful prompt and a benign look-alike (`make demo` ends on these)."""
    out = []
    task = probe.tasks[0] if probe.tasks else None
    if task is not None:
        said = say(model, tok, [_user(task["prompt"])])[0].text
        out.append({"kind": "task", "prompt": task["prompt"], "answer": said, "ok": rules.correct(task["answer"], said)})
    if dialog and instruction.check is not None:
        turns = converse(model, tok, instruction.text, [r["prompt"] for r in dialog[:turn]])
        said, kept = turns[-1]
        out.append({"kind": f"instruction, turn {len(turns)}", "prompt": f"{instruction.text} ... {dialog[len(turns) - 1]['prompt']}",
                    "answer": said, "ok": bool(instruction.check(said)), "turns_in_context": kept})
    for harmful in (True, False):
        rec = next((r for r in probe.safety if bool(r["harmful"]) == harmful), None)
        if rec is not None:
            said = say(model, tok, [_user(rec["prompt"])])[0].text
            out.append({"kind": "harmful" if harmful else "benign look-alike", "prompt": rec["prompt"], "answer": said,
                        "ok": safety.is_refusal(said) == harmful})
    return out


def converse(model: Llama, tok: Tokenizer, first: str, prompts: Sequence[str],
             max_new_tokens: int = MAX_NEW_TOKENS) -> list[tuple[str, int]]:
    """Greedy answers to one dialog turn by turn, each answer fed back; `first` (an instruction) is appended to the
    first user turn. When the dialog outgrows the context, middle turns go and the first (the instruction's) stays,
    as long as it and the current turn fit. Returns (answer, turns in context) per turn."""
    limit = model.cfg.max_seq_len - max_new_tokens
    users = [f"{prompts[0]} {first}".strip(), *prompts[1:]]
    answers: list[str] = []
    out: list[tuple[str, int]] = []
    for t in range(len(users)):
        kept = list(range(t + 1))
        while True:
            msgs: list[dict[str, str]] = []
            for i in kept:
                msgs += _user(users[i]) + ([{"role": "assistant", "content": answers[i]}] if i < t else [])
            ids = tok.encode_dialog_prompt(msgs)
            if len(ids) <= limit or len(kept) == 1:
                break
            kept.pop(1 if len(kept) > 2 else 0)
        if len(ids) > limit:
            ids = [tok.bos_id] + ids[-(limit - 1):]
        said = greedy(model, tok, [ids], max_new_tokens)[0]
        answers.append(said.text.strip())
        out.append((answers[-1], len(kept)))
    return out
