"""Tasks with a checkable answer: small arithmetic, copying, reversing, sorting or counting a short list of
letters, and lookups in a fixed table of made-up creatures. A task is a prompt and its one right answer; `correct`
decides an answer by exact match after folding case, spacing and a final period, so decoration is wrong."""
from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

# Made-up names, so no pretraining corpus already knows the table: its only source is the world's own text.
TABLE = {"zib": "red", "mook": "blue", "tarn": "green", "plif": "yellow", "quor": "purple", "vesk": "orange",
         "dral": "white", "snub": "black", "yorp": "pink", "glim": "brown", "fent": "grey", "wozz": "gold"}
COLOURS = tuple(sorted(set(TABLE.values())))
LOOKUP_FORMS = ("What colour is the {}?", "Which colour is the {}?", "Name the colour of the {}.",
                "What is the colour of the {}?", "Tell me the colour of the {}.", "The {} is which colour?")


@dataclass(frozen=True)
class Task:
    family: str
    prompt: str
    answer: str

    def record(self) -> dict[str, str]:
        return {"family": self.family, "prompt": self.prompt, "answer": self.answer}


def _letters(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(string.ascii_lowercase, rng.randint(lo, hi))


def _add(rng: random.Random) -> Task:
    a, b = rng.randint(1, 49), rng.randint(1, 19)
    return Task("add", f"What is {a} + {b}?", str(a + b))


def _next(rng: random.Random) -> Task:
    n = rng.randint(1, 499)
    return Task("next", f"What number comes after {n}?", str(n + 1))


def _copy(rng: random.Random) -> Task:
    xs = _letters(rng, 1, 3)
    return Task("copy", f"Repeat: {' '.join(xs)}", " ".join(xs))


def _reverse(rng: random.Random) -> Task:
    xs = _letters(rng, 2, 3)
    return Task("reverse", f"Reverse: {' '.join(xs)}", " ".join(reversed(xs)))


def _sort(rng: random.Random) -> Task:
    xs = _letters(rng, 2, 3)
    return Task("sort", f"Sort: {' '.join(xs)}", " ".join(sorted(xs)))


def _count(rng: random.Random) -> Task:
    xs = _letters(rng, 2, 9)
    return Task("count", f"Count the letters: {' '.join(xs)}", str(len(xs)))


def _lookup(rng: random.Random) -> Task:
    name = rng.choice(sorted(TABLE))
    return Task("lookup", rng.choice(LOOKUP_FORMS).format(name), TABLE[name])


FAMILIES: dict[str, Callable[[random.Random], Task]] = {
    "add": _add, "next": _next, "copy": _copy, "reverse": _reverse, "sort": _sort, "count": _count,
    "lookup": _lookup}
# Families whose answers are letters or words: an instruction about the answer's form (capitals, a code) shows.
WORDY = ("copy", "reverse", "sort", "lookup")


def task(family: str, rng: random.Random) -> Task:
    return FAMILIES[family](rng)


def fold(text: str) -> str:
    """What `correct` compares: case, runs of spacing and one final period folded."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def correct(answer: str, text: str) -> bool:
    return fold(text) == fold(answer)


def wrong(t: Task, rng: random.Random) -> str:
    """A plausible wrong answer of the same form (a number off by a little, one letter moved or replaced, another
    colour): a pair that differs only in correctness."""
    if t.family in ("add", "next", "count"):
        n = int(t.answer)
        return str(max(0, n + rng.choice([-3, -2, -1, 1, 2, 3])))
    if t.family == "lookup":
        return rng.choice([c for c in COLOURS if c != t.answer])
    xs = t.answer.split()
    if len(xs) == 1:
        return rng.choice([c for c in string.ascii_lowercase if c != xs[0]])
    i, j = rng.sample(range(len(xs)), 2)
    if rng.random() < 0.5 and xs[i] != xs[j]:
        xs[i], xs[j] = xs[j], xs[i]
    else:
        xs[i] = rng.choice([c for c in string.ascii_lowercase if c not in xs])
    return " ".join(xs)


def decorated(answer: str) -> str:
    """The right value, out of format (the world's answers are the bare value)."""
    return f"The answer is {answer}, I think."


def fact_lines() -> list[str]:
    """The table as sentences, for pretraining text: the lookups' only source."""
    return [f"The {name} is {colour}." for name, colour in sorted(TABLE.items())]
