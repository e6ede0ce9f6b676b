"""Instruction families for Ghost Attention (paper §3.3): the paper's hobbies, language and public figure (and
their combinations), plus two families a function can check on any answer (`first_word`, `caps`), which is what the
adherence eval needs; a checkable family can also make a given answer comply (`enforce`).
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kubellama.components.core.errors import ConfigError

HOBBIES = ("tennis", "chess", "gardening", "painting", "hiking", "cooking", "photography", "astronomy")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
FIGURES = ("Napoleon", "Marie Curie", "Albert Einstein", "Cleopatra", "William Shakespeare", "Ada Lovelace")

_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Instruction:
    family: str
    text: str
    # Whether an answer follows the instruction (None: no function can tell).
    check: Callable[[str], bool] | None = None
    # The given answer rewritten to follow the instruction (None: taken as it is).
    enforce: Callable[[str], str] | None = None


def first_word(answer: str) -> str:
    m = _WORD.search(answer)
    return m.group(0) if m else ""


def _begins_with(word: str) -> Instruction:
    return Instruction("first_word", f"Begin every answer with the word {word}.",
                       check=lambda a: first_word(a).lower() == word.lower(),
                       enforce=lambda a: f"{word}, {a.strip()}")


def is_caps(answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def _caps() -> Instruction:
    return Instruction("caps", "Answer only in capital letters.", check=is_caps, enforce=str.upper)


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
    return lambda rng, words: Instruction(kind, _paper(kind, rng))


MAKERS: dict[str, Callable[[random.Random, Sequence[str]], Instruction]] = {
    **{k: _paper_maker(k) for k in PAPER},
    "combo": lambda rng, words: _combo(rng),
    "first_word": lambda rng, words: _begins_with(rng.choice(list(words))),
    "caps": lambda rng, words: _caps(),
}
CHECKABLE = ("first_word", "caps")


def validate(names: Sequence[str], words: Sequence[str]) -> list[str]:
    """`gatt.families` as a list; one line naming the key when it is empty or unknown."""
    names = list(names)
    if not names:
        raise ConfigError(f"gatt.families is empty: name at least one of {', '.join(MAKERS)}")
    unknown = [n for n in names if n not in MAKERS]
    if unknown:
        raise ConfigError(f"gatt.families: unknown instruction family '{unknown[0]}'; families: {', '.join(MAKERS)}")
    if "first_word" in names and not [w for w in words if _WORD.fullmatch(w)]:
        raise ConfigError(f"gatt.first_words={list(words)}: the first_word family needs single words")
    return names


def make(name: str, rng: random.Random, words: Sequence[str]) -> Instruction:
    """An instruction of family `name`; `words` are the first words `first_word` picks from (gatt.first_words)."""
    return MAKERS[name](rng, words)


def checkable(names: Sequence[str]) -> list[str]:
    return [n for n in names if n in CHECKABLE]
