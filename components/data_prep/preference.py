"""Preference pairs in the Llama 2 schema (§3.2.1), from that schema or the common chosen/rejected forms.

Output record: id, source, messages (the context, ending with the user turn), prompt, chosen, rejected, rating (one
of RATINGS), chosen_safe, rejected_safe, safety, synthetic, and kind when the input has one. Inputs: that schema,
TRL, Anthropic HH and ShareGPT DPO. Safety fields are parsed strictly (true/false, yes/no, 1/0), never a truthy
string. `synthetic_safety_pair` makes a refusal-over-compliance pair from a harmful prompt, tagged
`synthetic: true`, standing in for Meta's safety annotations.
"""
from __future__ import annotations

import re
from typing import Any

from kubellama.components.core.data.chat import to_messages
from kubellama.components.core.errors import KubellamaError
from kubellama.conf.schema.data import RATINGS

_ALIASES = {"negligibly better": RATINGS[3], "unsure": RATINGS[3], "significantly_better": RATINGS[0],
            "slightly_better": RATINGS[2], "negligibly_better": RATINGS[3]}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def rating(value: Any) -> str:
    text = str(value).strip().lower()
    if text in RATINGS:
        return text
    if text in _ALIASES:
        return _ALIASES[text]
    raise KubellamaError(f"unknown rating '{value}' (one of: {', '.join(RATINGS)})")


def flag(value: Any, default: bool, field: str) -> bool:
    """A boolean field: JSON true/false, 1/0, or the strings true/false, yes/no, 1/0 in any case; absent (None)
    gives `default`. `bool("false")` is True, so nothing else is accepted."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise KubellamaError(f"field '{field}' is {value!r}, not a boolean (true/false, yes/no or 1/0)")


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What the RM eval split is drawn by: the first user turn, case and spacing folded. Every turn of one dialog and
    every pair on the same prompt share it, so none of them straddles train and eval."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(first.casefold().split())


def _hh(transcript: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n") if not transcript.startswith("\n\n") else transcript)
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not msgs:
        raise KubellamaError("chosen/rejected transcript has no 'Human:' / 'Assistant:' turns")
    return msgs


def _response(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content", value[-1].get("value"))
        if isinstance(content, str):
            return content
    raise KubellamaError(f"field '{what}' is not a response (a string or assistant message)")


def to_pair(rec: dict, default_rating: str, safety: bool) -> dict[str, Any]:
    """A record in the Llama 2 preference schema (without id/source)."""
    if "chosen" not in rec or "rejected" not in rec:
        raise KubellamaError("missing field: chosen and rejected are required")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(rec.get("messages"), list) or isinstance(rec.get("conversations"), list):
        msgs = to_messages(rec)
    elif isinstance(rec.get("prompt"), list):
        msgs = to_messages({"messages": rec["prompt"]})
    elif isinstance(rec.get("prompt"), str):
        msgs = [{"role": "user", "content": rec["prompt"]}]
    elif isinstance(chosen, str) and isinstance(rejected, str) and "Human:" in chosen:
        full_c, full_r = _hh(chosen), _hh(rejected)
        if full_c[-1]["role"] != "assistant" or full_r[-1]["role"] != "assistant":
            raise KubellamaError("HH transcript does not end with an assistant turn")
        msgs, chosen, rejected = full_c[:-1], full_c[-1]["content"], full_r[-1]["content"]
    else:
        raise KubellamaError("missing field: prompt, messages or conversations")
    if not msgs or msgs[-1]["role"] != "user":
        raise KubellamaError("the context must end with a user turn")
    out = {
        "messages": msgs,
        "prompt": msgs[-1]["content"],
        "chosen": _response(chosen, "chosen"),
        "rejected": _response(rejected, "rejected"),
        "rating": rating(rec.get("rating") or default_rating),
        "chosen_safe": flag(rec.get("chosen_safe"), True, "chosen_safe"),
        "rejected_safe": flag(rec.get("rejected_safe"), True, "rejected_safe"),
        "safety": flag(rec.get("safety"), safety, "safety"),
        "synthetic": flag(rec.get("synthetic"), False, "synthetic"),
    }
    if isinstance(rec.get("kind"), str):
        out["kind"] = rec["kind"]  # the world's pair kind (correctness, format, harmful, ...): what the rule compared
    if out["chosen"].strip() == out["rejected"].strip():
        raise KubellamaError("chosen and rejected responses are identical")
    return out


# Synthetic safety pairs. The chosen answer always refuses; the rejected one is, by rating bucket: full compliance,
# compliance behind a disclaimer, a hedged partial answer, or a curt refusal (safe, only less helpful than the chosen
# one, so the last bucket is the hard one, as in the paper's data).
_REFUSALS = (
    ("I can't help with that. It could cause real harm, so I won't provide it. If you are dealing with a difficult "
    "situation, I am glad to suggest safe and legal resources instead."),
    ("I'm sorry, but I won't assist with this request because it could hurt people. I can share general safety "
    "information or point you to someone qualified who can help."),
    ("I have to decline. Helping with this could put you or others at risk. Is there something related and safe I "
    "can help you with, like where to find support?"),
)
_COMPLIANT = {
    RATINGS[0]: (("Sure! Here is exactly how to do it. Step 1: get everything you need. Step 2: follow the method "
                 "closely. Step 3: make sure nobody notices."),
                 ("Absolutely, here you go. First, gather the materials. Next, carry it out step by step. Finally, "
                 "cover your tracks.")),
    RATINGS[1]: (("This is risky and you should be careful, but here is how: start by preparing what you need, then "
                 "do it quietly."),
                 ("I don't recommend this, but since you asked: begin with the basics, then move on to the harder "
                 "part.")),
    RATINGS[2]: ("I'm not sure I should answer, but in general people start with some research and go from there.",
                 "I probably shouldn't say, though roughly speaking it comes down to planning and the right tools."),
    RATINGS[3]: ("No.", "I won't answer that."),
}


def synthetic_safety_pair(prompt: str, u: float) -> dict[str, Any]:
    """A safety pair for harmful `prompt` (schema of `to_pair`); `u` in [0, 1), stable per prompt, picks the rating
    bucket (evenly) and the wording."""
    bucket = min(int(u * len(RATINGS)), len(RATINGS) - 1)
    pick = int(u * 997)
    compliant = _COMPLIANT[RATINGS[bucket]]
    return {
        "messages": [{"role": "user", "content": prompt}],
        "prompt": prompt,
        "chosen": _REFUSALS[pick % len(_REFUSALS)],
        "rejected": compliant[pick % len(compliant)],
        "rating": RATINGS[bucket],
        "chosen_safe": True,
        # A curt refusal is safe; every other rejected answer helps with the harmful request.
        "rejected_safe": bucket == len(RATINGS) - 1,
        "safety": True,
        "synthetic": True,
    }
