"""95% intervals for the world's figures: Wilson for rates, a seeded percentile bootstrap for means; and the
report's before/after shape, `{"before": {"value", "ci"}, "after": {"value", "ci"}, "n"}`."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(xs: Sequence[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean; seeded, so a report is reproducible."""
    if not xs:
        return 0.0, 0.0
    rng, n = random.Random(seed), len(xs)
    means = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(draws))
    return means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))]


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "ci": [round(lo, 4), round(hi, 4)], "n": n}


def mean(xs: Sequence[float]) -> dict[str, Any]:
    lo, hi = bootstrap(list(xs))
    return {"value": sum(xs) / len(xs) if xs else None, "ci": [round(lo, 4), round(hi, 4)], "n": len(xs)}


def before_after(before: dict[str, Any], after: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One metric's figures of the init ("before") and the output ("after"), both {"value", "ci", "n"}."""
    return {"before": {"value": before["value"], "ci": before["ci"]},
            "after": {"value": after["value"], "ci": after["ci"]}, "n": after["n"], **extra}


def clear_rise(metric: dict[str, Any]) -> bool:
    """The issue's "intervals not overlapping": after's lower bound above before's upper bound."""
    return bool(metric["after"]["ci"][0] > metric["before"]["ci"][1])
