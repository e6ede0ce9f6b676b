"""Instruction families for Ghost Attention (paper §3.3).

The paper's hobby, language and public figure (and their combinations) need its RLHF model to answer them; with
answers given by the dialogs (`gatt.answers=given`) nothing could make those answers comply, so the set would train
"Always answer in Italian." on an English answer. The enforceable families stand in for them: a function checks
an answer (`check`, what the adherence eval needs) and rewrites a given one to comply (`enforce`):
`first_word` (a start word), `end_word` (an end word), `code` (a language-like code: every word gets a suffix) and
`caps`. Each valued family draws from training values or from disjoint held-out ones (the eval's new instructions).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.world.instructions import WORD, Instruction, begins_with, caps, code, ends_with
from kubellama.conf.schema.gatt import GattConfig

HOBBIES = ("tennis", "chess", "gardening", "painting", "hiking", "cooking", "photography", "astronomy")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
FIGURES = ("Napoleon", "Marie Curie", "Albert Einstein", "Cleopatra", "William Shakespeare", "Ada Lovelace")

# Values of a valued family: a mapping family -> values, or one list, taken as the first words (how gatt.first_words
# was passed before the other families had values).
Values = Sequence[str] | Mapping[str, Sequence[str]]


def _paper(kind: str, rng: random.Random) -> str:
    if kind == "hobby":
        return f"You enjoy {rng.choice(HOBBIES)}."
    if kind == "language":
        return f"Always answer in {rng.choice(LANGUAGES)}."
    return f"Act as {rng.choice(FIGURES)}."


PAPER = ("hobby", "language", "figure")


def _combo(rng: random.Random) -> Instruction:
    return Instruction("combo", " ".join(_paper(k, rng) for k in rng.sample(PAPER, 2)))


def _paper_maker(kind: str) -> Callable[[random.Random, Sequence[str]], Instruction]:
    return lambda rng, values: Instruction(kind, _paper(kind, rng))


MAKERS: dict[str, Callable[[random.Random, Sequence[str]], Instruction]] = {
    **{k: _paper_maker(k) for k in PAPER},
    "combo": lambda rng, values: _combo(rng),
    "first_word": lambda rng, values: begins_with(rng.choice(list(values))),
    "end_word": lambda rng, values: ends_with(rng.choice(list(values))),
    "code": lambda rng, values: code(rng.choice(list(values))),
    "caps": lambda rng, values: caps(),
}
# Families a function checks and enforces on any answer; the others only under answers=sample.
ENFORCEABLE = ("first_word", "end_word", "code", "caps")
CHECKABLE = ENFORCEABLE
# The config keys of each valued family: (training values, held-out values).
KEYS = {"first_word": ("first_words", "heldout_first_words"), "end_word": ("end_words", "heldout_end_words"),
        "code": ("codes", "heldout_codes")}
DEFAULTS = GattConfig()


def values(p: GattConfig, heldout: bool = False) -> dict[str, list[str]]:
    """The values each valued family draws from: training (gatt.first_words, ...) or held out
    (gatt.heldout_first_words, ...)."""
    return {f: list(getattr(p, keys[heldout])) for f, keys in KEYS.items()}


def _family_values(name: str, given: Values) -> Sequence[str]:
    if isinstance(given, Mapping):
        found = list(given.get(name, ()))
    elif name in KEYS and name != "first_word":
        found = list(getattr(DEFAULTS, KEYS[name][0]))
    else:
        found = list(given)
    if name in KEYS and not found:
        raise ConfigError(f"gatt.{KEYS[name][0]} is empty: the {name} family needs values")
    return found


def validate(names: Sequence[str], words: Sequence[str]) -> list[str]:
    """`gatt.families` as a list; one line naming the key when it is empty or unknown."""
    names = list(names)
    if not names:
        raise ConfigError(f"gatt.families is empty: name at least one of {', '.join(MAKERS)}")
    unknown = [n for n in names if n not in MAKERS]
    if unknown:
        raise ConfigError(f"gatt.families: unknown instruction family '{unknown[0]}'; families: {', '.join(MAKERS)}")
    if "first_word" in names and not [w for w in words if WORD.fullmatch(w)]:
        raise ConfigError(f"gatt.first_words={list(words)}: the first_word family needs single words")
    return names


def validate_config(p: GattConfig) -> list[str]:
    """`gatt.families` checked against the rest of `gatt`: every family known; under answers=given every family
    enforceable (else the set trains answers that ignore their instruction); each valued family's training and
    held-out values single words, and disjoint."""
    names = validate(p.families, p.first_words)
    if p.answers == "given":
        loose = [n for n in names if n not in ENFORCEABLE]
        if loose:
            raise ConfigError(f"gatt.families: '{loose[0]}' cannot be enforced on given answers (gatt.answers=given "
                              f"would train answers that ignore it): use {', '.join(ENFORCEABLE)}, or set "
                              f"gatt.answers=sample")
    for family, keys in KEYS.items():
        lists = [list(getattr(p, k)) for k in keys]
        for key, vals in zip(keys, lists):
            if family in names and not vals:
                raise ConfigError(f"gatt.{key} is empty: the {family} family needs values")
            bad = [v for v in vals if not WORD.fullmatch(v)]
            if bad:
                raise ConfigError(f"gatt.{key}: {bad[0]!r} is not a single word")
        shared = [v for v in lists[1] if v.lower() in {t.lower() for t in lists[0]}]
        if shared:
            raise ConfigError(f"gatt.{keys[1]} must be disjoint from gatt.{keys[0]}: {shared[0]!r} is in both "
                              f"(held-out instructions are never trained)")
    return names


def make(name: str, rng: random.Random, values: Values) -> Instruction:
    """An instruction of family `name`. `values`: {family: values} (see `values()`); a plain list is the first
    words, the other valued families then taking gatt's default training values."""
    return MAKERS[name](rng, _family_values(name, values))


def checkable(names: Sequence[str]) -> list[str]:
    return [n for n in names if n in CHECKABLE]
