"""Preference pairs as data prep writes them (preference/{train,eval}.jsonl), read and checked record by record:
what the reward models train on and PPO scores its held-out set with."""
from __future__ import annotations

from typing import Any

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io.jsonl import read_lines
from kubellama.conf.schema.data import RATINGS

# Every record's fields and their JSON types (the Llama 2 schema data prep writes).
FIELDS = {"messages": list, "chosen": str, "rejected": str, "rating": str, "chosen_safe": bool,
          "rejected_safe": bool, "safety": bool}


def read_pairs(url: str) -> tuple[list[dict[str, Any]], str]:
    """The pairs of one preference split and the sha256 of the file (what the run's fingerprint records)."""
    lines, digest = read_lines(url, "no preference pairs (run data prep with data.preference.sources or "
                                    "data.preference.synthetic_safety)")
    pairs = []
    for n, rec in lines:
        bad = [k for k, t in FIELDS.items() if not isinstance(rec.get(k) if isinstance(rec, dict) else None, t)]
        if bad or rec["rating"] not in RATINGS or not rec["messages"]:
            what = f"field '{bad[0]}' missing or mistyped" if bad else "unknown rating or empty messages"
            raise KubellamaError(f"{url}:{n}: not a preference pair of data prep ({what})")
        rec.setdefault("synthetic", False)
        pairs.append(rec)
    return pairs, digest
