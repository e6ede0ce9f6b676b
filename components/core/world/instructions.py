"""Persistent instructions of the world (Ghost Attention's, paper §3.3), each with a rule that checks an answer and
rewrites one to comply: start with a word, end with a word, a language-like code (every word gets a suffix), and
capitals. Held-out values (a start word never trained) make new instructions of a trained family."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Instruction:
    family: str
    text: str
    # Whether an answer follows the instruction (None: no function can tell).
    check: Callable[[str], bool] | None = None
    # The given answer rewritten to follow the instruction (None: no function can make it comply).
    enforce: Callable[[str], str] | None = None


def first_word(answer: str) -> str:
    m = WORD.search(answer)
    return m.group(0) if m else ""


def last_word(answer: str) -> str:
    words = WORD.findall(answer)
    return words[-1] if words else ""


def begins_with(word: str) -> Instruction:
    return Instruction("first_word", f"Begin every answer with the word {word}.",
                       check=lambda a: first_word(a).lower() == word.lower(),
                       enforce=lambda a: f"{word}, {a.strip()}")


def ends_with(word: str) -> Instruction:
    return Instruction("end_word", f"End every answer with the word {word}.",
                       check=lambda a: last_word(a).lower() == word.lower(),
                       enforce=lambda a: f"{a.strip()} {word}.")


def in_code(answer: str, suffix: str) -> bool:
    words = WORD.findall(answer)
    return bool(words) and all(w.lower().endswith(suffix.lower()) for w in words)


def code(suffix: str) -> Instruction:
    # The "language" stands in for the paper's "Always answer in Italian": a rule a function checks and applies.
    return Instruction("code", f"Answer in code {suffix}: end every word with {suffix}.",
                       check=lambda a: in_code(a, suffix),
                       enforce=lambda a: WORD.sub(lambda m: m.group(0) + suffix, a))


def is_caps(answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def caps() -> Instruction:
    return Instruction("caps", "Answer only in capital letters.", check=is_caps, enforce=str.upper)
