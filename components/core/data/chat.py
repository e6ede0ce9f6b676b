"""SFT data: dialogs rendered in the Llama 2 chat format and packed into shards with labels and example ids.

Accepted records: `messages` (OpenAI / Llama style), ShareGPT `conversations`, and Alpaca. Shards carry `labels`
(IGNORE off assistant answers), `segments` (example id in the row) and `turns` (assistant turns still to come).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kubellama.components.core.data.shards import ShardWriter
from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import KubellamaError

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant"}


def to_messages(rec: dict) -> list[dict[str, str]]:
    """A record's dialog as [{role, content}]; KubellamaError saying what is wrong otherwise."""
    if isinstance(rec.get("messages"), list) or isinstance(rec.get("conversations"), list):
        raw = rec["messages"] if isinstance(rec.get("messages"), list) else rec["conversations"]
        msgs = []
        for m in raw:
            if not isinstance(m, dict):
                raise KubellamaError("a message is not an object")
            role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
            content = m.get("content", m.get("value"))
            if role is None or not isinstance(content, str):
                raise KubellamaError(f"message without a known role and string content: {str(m)[:80]}")
            msgs.append({"role": role, "content": content})
        if isinstance(rec.get("system"), str) and rec["system"] and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
        msgs = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) and \
            rec["system"] else []
        for turn in rec.get("history") or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise KubellamaError("history entries must be [user, assistant] string pairs")
            msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if isinstance(rec.get("input"), str) and
                                       rec["input"].strip() else "")
        return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    raise KubellamaError("missing field: expected messages, conversations, or instruction and output")


def turns(messages: Sequence[dict]) -> int:
    """Number of assistant turns in a dialog."""
    return sum(m["role"] == "assistant" for m in messages)


def turns_left(ids: Sequence[int], bos_id: int) -> list[int]:
    """Per token, how many turns of the dialog come after its own. Every turn of the Llama 2 chat format opens with
    BOS, which text never encodes to, so BOS marks the turns."""
    starts = np.asarray(ids) == bos_id
    turn = np.cumsum(starts) - 1
    return (int(starts.sum()) - 1 - turn).tolist()


def encode_dialog(tok: Tokenizer, messages: Sequence[dict], last_turn_only: bool = False
                  ) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, turns left) of a finished dialog; `last_turn_only` sets IGNORE on every earlier turn."""
    ids, labels = tok.encode_dialog(messages, last_turn_only=last_turn_only)
    return ids, labels, turns_left(ids, tok.bos_id)


def chain(dialogs: Iterable[Sequence[dict]], max_turns: int, seed: int) -> list[list[dict]]:
    """Multi-turn dialogs made of consecutive single-turn ones, 2..max_turns turns each (a seeded draw); a system
    message is kept only where it opens a chain. A last chain of one turn is dropped."""
    rng = random.Random(seed)
    out: list[list[dict]] = []
    current: list[dict] = []
    want = rng.randint(2, max_turns)
    for msgs in dialogs:
        body = [dict(m) for m in msgs if m["role"] != "system" or not current]
        current += body
        if turns(current) >= want:
            out.append(current)
            current, want = [], rng.randint(2, max_turns)
    if turns(current) >= 2:
        out.append(current)
    return out


class SftPacker:
    """Packs (ids, labels, turns) examples into rows of seq_len, first come first served, without splitting examples.

    A row's unused tail is filled with EOS tokens, labels IGNORE and example id and turns -1. Examples longer than a
    row are truncated (counted).
    """

    def __init__(self, writer: ShardWriter, seq_len: int, pad_id: int):
        self.writer, self.seq_len, self.pad = writer, seq_len, pad_id
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.segs: list[int] = []
        self.turns: list[int] = []
        self.examples = self.truncated = self.rows = self.trained = self.padding = 0

    def add(self, ids: list[int], labels: list[int], turns: list[int]) -> None:
        if len(ids) > self.seq_len:
            ids, labels, turns = ids[:self.seq_len], labels[:self.seq_len], turns[:self.seq_len]
            self.truncated += 1
        if len(self.ids) + len(ids) > self.seq_len:
            self._flush()
        self.ids += ids
        self.labels += labels
        self.turns += turns
        self.segs += [self.examples] * len(ids)
        self.trained += sum(1 for x in labels if x != IGNORE)
        self.examples += 1

    def _flush(self) -> None:
        if not self.ids:
            return
        fill = self.seq_len - len(self.ids)
        self.padding += fill
        self.writer.add(np.array(self.ids + [self.pad] * fill),
                        labels=np.array(self.labels + [IGNORE] * fill),
                        segments=np.array(self.segs + [-1] * fill),
                        turns=np.array(self.turns + [-1] * fill))
        self.ids, self.labels, self.segs, self.turns = [], [], [], []
        self.rows += 1

    def close(self, **meta: Any) -> dict[str, Any]:
        """Flush, publish the shard set (with `meta` in its manifest) and return the counts."""
        self._flush()
        stats = {"examples": self.examples, "rows": self.rows, "truncated": self.truncated,
                 "trained_tokens": self.trained, "padding_tokens": self.padding}
        self.writer.close(**meta, **stats)
        return stats


def sft_writer(url: str, seq_len: int, vocab_size: int, shard_rows: int) -> ShardWriter:
    return ShardWriter(url, seq_len, vocab_size, shard_rows=shard_rows,
                       fields={"labels": "<i4", "segments": "<i4", "turns": "<i2"})


PROMPT_FIELDS = ("prompt", "instruction", "question", "value", "text")


def prompt_text(rec: dict, field: str) -> str | None:
    for key in (field, *PROMPT_FIELDS):
        if isinstance(rec.get(key), str) and rec[key].strip():
            text = rec[key]
            if key == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
                text += "\n\n" + rec["input"]
            return text
    if isinstance(rec.get("messages"), list) or isinstance(rec.get("conversations"), list):
        users = [m["content"] for m in to_messages(rec) if m["role"] == "user"]
        return users[-1] if users else None
    return None
