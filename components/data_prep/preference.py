"""Preference pairs in the Llama 2 schema (§3.2.1), from that schema or the common chosen/rejected forms.

Output record (one JSON object per line):
  id, source, messages (the context, ending with the user turn), prompt (that last user turn), chosen, rejected,
  rating (significantly better | better | slightly better | negligibly better or unsure),
  chosen_safe, rejected_safe (safety label per response), safety (the prompt's safety tag).
Inputs: that schema (`prompt` or `messages`); TRL (`prompt`, `chosen`, `rejected` as strings or message lists);
Anthropic HH (`chosen` / `rejected` transcripts with "Human:" / "Assistant:" turns); ShareGPT DPO
(`conversations` plus `chosen` / `rejected` messages). Responses without a safety label count as safe.
"""
from __future__ import annotations

import re
from typing import Any

from components.core.errors import KubellamaError
from components.data_prep.chat import to_messages

RATINGS = ["significantly better", "better", "slightly better", "negligibly better or unsure"]
_ALIASES = {"negligibly better": RATINGS[3], "unsure": RATINGS[3], "significantly_better": RATINGS[0],
            "slightly_better": RATINGS[2], "negligibly_better": RATINGS[3]}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def rating(value: Any) -> str:
    text = str(value).strip().lower()
    if text in RATINGS:
        return text
    if text in _ALIASES:
        return _ALIASES[text]
    raise KubellamaError(f"unknown rating '{value}' (one of: {', '.join(RATINGS)})")


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
        "chosen_safe": bool(rec.get("chosen_safe", True)),
        "rejected_safe": bool(rec.get("rejected_safe", True)),
        "safety": bool(rec.get("safety", safety)),
    }
    if out["chosen"].strip() == out["rejected"].strip():
        raise KubellamaError("chosen and rejected responses are identical")
    return out
