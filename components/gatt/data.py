"""The Ghost Attention training set (paper §3.3): an instruction in every user turn while answers are given or
sampled, then kept in the first user turn only, with label IGNORE on every earlier turn's token: only the last
answer is trained. A dialog longer than a row loses its middle turns (the adherence eval fits its prompts the same
way). Written under `<gatt.output>/set/` (train/ and eval/ shards, the examples as JSONL, stats.json).
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubellama.components.core.data.chat import SftPacker, encode_dialog, sft_writer
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.jsonl import jsonl_splits
from kubellama.components.core.world.instructions import Instruction
from kubellama.components.gatt.families import Values, make

SPLITS = ("train", "eval")
# The family name a plain dialog (no instruction, gatt.plain_share) is counted under.
PLAIN = "plain"


@dataclass
class Dialog:
    system: str | None
    users: list[str]
    answers: list[str]
    instruction: Instruction | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def cut(text: str, chars: int) -> str:
    """`text` cut to at most `chars` characters at a word boundary (0: unchanged)."""
    if chars <= 0 or len(text) <= chars:
        return text
    head = text[:chars]
    return (head.rsplit(None, 1)[0] if " " in head.strip() else head).rstrip()


def to_dialog(messages: Sequence[dict], chars: int = 0) -> Dialog:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = list(messages[1:] if system is not None else messages)
    users = [cut(m["content"], chars) for m in rest if m["role"] == "user"]
    answers = [cut(m["content"], chars) for m in rest if m["role"] == "assistant"]
    return Dialog(system, users, answers)


def to_messages(system: str | None, users: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """A dialog as messages; one user turn more than answers makes a prompt for generation."""
    msgs = [{"role": "system", "content": system}] if system else []
    for i, u in enumerate(users):
        msgs.append({"role": "user", "content": u})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


def read_dialogs(url: str, min_turns: int = 1, limit: int = 0, chars: int = 0) -> list[Dialog]:
    """Dialogs of data prep's sft/dialogs/<split>.jsonl with at least `min_turns` turns (at most `limit`)."""
    import json

    if not storage.exists(url):
        raise KubellamaError(f"{url} does not exist: run data prep with data.sft.sources (it writes the dialogs)")
    out = []
    for n, line in enumerate(storage.read_text(url).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = to_dialog(json.loads(line)["messages"], chars)
        except (ValueError, KeyError, TypeError) as exc:
            raise KubellamaError(f"{url}:{n}: not a dialog record ({exc})") from None
        if len(d.answers) >= min_turns and len(d.users) == len(d.answers):
            out.append(d)
            if limit and len(out) >= limit:
                break
    return out


def fit_turns(turns: int, length: Callable[[list[int]], int], limit: int) -> list[int] | None:
    """Indices of the turns to keep so that `length(kept)` <= `limit`: the middle ones go first (the first holds the
    instruction, the last is the one that counts); None when first and last alone are too long."""
    kept = list(range(turns))
    while length(kept) > limit:
        if len(kept) <= 2:
            return None
        del kept[1]
    return kept


def plain(dialogs: Sequence[Dialog], instructed: int, share: float, seed: int, min_turns: int = 2) -> list[Dialog]:
    """Plain dialogs (no instruction) making up `share` of a set of `instructed` ones, a seeded draw from `dialogs`
    (repeated when there are too few): half of them of at least `min_turns` turns, as long as the instructed ones,
    so that a long dialog alone does not come to mean "follow an instruction"; half from every dialog, so that
    what SFT taught in single turns (answers, refusals) stays."""
    want = round(instructed * share / (1.0 - share)) if share > 0 else 0
    long = [d for d in dialogs if len(d.answers) >= min_turns]
    rng = random.Random(seed)
    out: list[Dialog] = []
    for pool, n in ((long, want // 2), (list(dialogs), want - want // 2)):
        pool = pool or list(dialogs)
        if not n or not pool:
            continue
        order = [i for _ in range(-(-n // len(pool))) for i in rng.sample(range(len(pool)), len(pool))]
        out += [Dialog(pool[i].system, pool[i].users, pool[i].answers, None, {"plain": True}) for i in order[:n]]
    return out


def assign(dialogs: list[Dialog], families: Sequence[str], values: Values, seed: int) -> list[Dialog]:
    """Give every dialog an instruction: families in turn, their content drawn from a seeded stream and from the
    families' training `values` (families.values(cfg.gatt))."""
    rng = random.Random(seed)
    for i, d in enumerate(dialogs):
        d.instruction = make(families[i % len(families)], rng, values)
    return dialogs


def with_instruction(users: Sequence[str], instruction: Instruction, every_turn: bool) -> list[str]:
    """User turns with the instruction appended: to every turn (how answers are made) or the first only (how the
    model is trained and evaluated)."""
    return [f"{u} {instruction.text}" if (every_turn or i == 0) else u for i, u in enumerate(users)]


def example(d: Dialog, tok: Tokenizer, seq_len: int, enforce: bool, last_only: bool = True
            ) -> tuple[list[dict], tuple] | None:
    """The GAtt training example of dialog `d`: (messages, (ids, labels, turns left)), or None if it cannot fit.
    An instructed dialog trains its last answer (`last_only`, the paper) or every answer; a plain one (no
    instruction) every answer, as SFT does."""
    inst = d.instruction
    answers = trained_answers(d, enforce)
    users = with_instruction(d.users, inst, every_turn=False) if inst else list(d.users)
    last_only = last_only and inst is not None

    def encoded(kept: list[int]) -> tuple:
        msgs = to_messages(d.system, [users[i] for i in kept], [answers[i] for i in kept])
        return msgs, encode_dialog(tok, msgs, last_turn_only=last_only)

    kept = fit_turns(len(users), lambda k: len(encoded(k)[1][0]), seq_len)
    return None if kept is None else encoded(kept)


def _enforce(inst: Instruction) -> Callable[[str], str]:
    if inst.enforce is None:
        # A given answer that ignores the instruction would teach the model to ignore it.
        raise ConfigError(f"gatt.families: '{inst.family}' cannot be enforced on given answers (gatt.answers=given "
                          f"would train answers that ignore '{inst.text}'): use an enforceable family or set "
                          f"gatt.answers=sample")
    return inst.enforce


def trained_answers(d: Dialog, enforce: bool) -> list[str]:
    """The answers the set trains for `d`: with `enforce` (answers given), rewritten to follow its instruction."""
    return [_enforce(d.instruction)(a) for a in d.answers] if enforce and d.instruction else list(d.answers)


def obeys(d: Dialog, enforce: bool) -> bool:
    """Whether every trained answer of `d` follows its instruction (True when no function can tell)."""
    check = d.instruction.check if d.instruction else None
    return check is None or all(check(a) for a in trained_answers(d, enforce))


def build(url: str, splits: dict[str, list[Dialog]], tok: Tokenizer, seq_len: int, enforce: bool,
          last_only: bool = True) -> dict[str, Any]:
    """Write the GAtt set of each split (dialogs with their instructions assigned, plain ones without); returns its
    counts. With `enforce` (answers given), every answer is rewritten to follow its instruction; `last_only`: an
    instructed dialog trains its last answer only."""
    if enforce:
        for d in (d for dialogs in splits.values() for d in dialogs if d.instruction):
            _enforce(d.instruction)
    storage.remove(storage.join(url, storage.COMPLETE))
    counts: Counter[str] = Counter()
    stats: dict[str, Any] = {}
    with jsonl_splits(url, SPLITS, counts) as write:
        for split in SPLITS:
            packer = SftPacker(sft_writer(storage.join(url, split), seq_len, tok.vocab_size, 65536), seq_len,
                               tok.eos_id)
            families: Counter[str] = Counter()
            skipped = disobeyed = 0
            for d in splits.get(split, []):
                # An answer a rule cannot make comply (caps on "42") is left out rather than trained as obeying.
                if not obeys(d, enforce):
                    disobeyed += 1
                    continue
                made = example(d, tok, seq_len, enforce, last_only)
                if made is None:
                    skipped += 1
                    continue
                msgs, encoded = made
                packer.add(*encoded)
                family = d.instruction.family if d.instruction else PLAIN
                families[family] += 1
                write(split, {"family": family, "instruction": d.instruction.text if d.instruction else None,
                              "messages": msgs, **d.meta})
            stats[split] = {**packer.close(tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size),
                            "too_long": skipped, "disobeyed": disobeyed, "families": dict(families)}
            if split == "train" and not stats[split]["examples"]:
                # Raised inside: the set is then never marked complete.
                raise KubellamaError(f"{url}: no GAtt training example (no dialog of enough turns fits a row of "
                                     f"{seq_len} tokens; lower gatt.min_turns or set gatt.message_chars)")
        storage.write_json(storage.join(url, "stats.json"), stats)
    return stats
