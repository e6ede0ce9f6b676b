"""SentencePiece tokenizer with Llama 2's conventions: BOS=1, EOS=2, UNK=0, no pad token; and the Llama 2 chat format.

Text round-trips exactly (`decode(encode(s)) == s` for any string) with a byte-fallback model and identity
normalisation, which is what data prep trains. One wrinkle is handled here: SentencePiece uses U+2581 ("▁") as its
whitespace symbol, so a literal "▁" in the text would come back as a space. `encode` spells a literal "▁" as its
three UTF-8 byte pieces instead, which decode back to the character.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage

META = "\u2581"
IGNORE = -100  # label of tokens that carry no loss (prompts, system text, padding)

# Llama 2 chat markup (facebookresearch/llama, generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def beside(data: str) -> str | None:
    """The tokenizer data prep wrote into its output folder `data`, if any. A manifest's own `tokenizer` URL is never
    followed: whoever can write the manifest could point it at any object and have its bytes copied into an export."""
    url = storage.join(data, "tokenizer.model")
    return url if storage.exists(url) else None


class Tokenizer:
    def __init__(self, url: str | None = None, *, model_bytes: bytes | None = None):
        if model_bytes is None:
            model_bytes = storage.read_bytes(str(url))
        data = model_bytes
        self.url = url
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as exc:  # a protobuf parse error: the file is not a model, and nothing ran
            raise KubellamaError(f"{url or 'tokenizer'}: not a SentencePiece model ({str(exc).strip()})") from None
        self.model_bytes = data
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        self._cont: spm.SentencePieceProcessor | None = None
        self._meta_ids: list[int] | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def _meta_pieces(self) -> tuple[list[int], spm.SentencePieceProcessor]:
        """Byte pieces spelling "▁", and a processor without the dummy prefix for text that continues a piece."""
        if self._cont is None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self.model_bytes)
            proto.normalizer_spec.add_dummy_prefix = False
            self._cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]
            # Without byte fallback there is no exact spelling; such models treat "▁" as a space like Llama's does.
            self._meta_ids = ids if 0 not in ids and self.sp.unk_id() not in ids else []
        return self._meta_ids or [], self._cont

    def _encode(self, text: str) -> list[int]:
        if META not in text:
            return self.sp.encode(text)
        meta, cont = self._meta_pieces()
        if not meta:
            return self.sp.encode(text)
        parts = text.split(META)
        ids = self.sp.encode(parts[0])
        for part in parts[1:]:
            ids += meta + cont.encode(part)
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call (SentencePiece's C++ batch path, `num_threads` threads)."""
        plain = [i for i, t in enumerate(texts) if META not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=num_threads)):
                out[i] = ids
        for i, t in enumerate(texts):
            if META in t:
                out[i] = self._encode(t)
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in out] if (head or tail) else out

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    # --- Llama 2 chat format -----------------------------------------------------------------------------------

    def encode_dialog(self, messages: Sequence[dict], last_turn_only: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and labels of a finished dialog: `<s>[INST] user [/INST] answer </s>` per turn.

        Labels equal the ids on assistant answers (their EOS included) and are IGNORE everywhere else, aligned with
        the ids (shift both the same way for next-token prediction). `last_turn_only` zeroes the loss on all but
        the final answer (Ghost Attention's previous turns).
        """
        turns = _turns(messages, finished=True)
        ids: list[int] = []
        labels: list[int] = []
        for n, (prompt, answer) in enumerate(turns):
            p = self.encode(f"{B_INST} {prompt.strip()} {E_INST}", bos=True)
            a = self.encode(f"{answer.strip()} ", bos=False, eos=True)
            train = not last_turn_only or n == len(turns) - 1
            ids += p + a
            labels += [IGNORE] * len(p) + (a if train else [IGNORE] * len(a))
        return ids, labels

    def encode_dialog_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a dialog ending with a user turn, ready for the model to write the answer (generation)."""
        turns = _turns(messages, finished=False)
        ids: list[int] = []
        for prompt, answer in turns[:-1]:
            ids += self.encode(f"{B_INST} {prompt.strip()} {E_INST}", bos=True)
            ids += self.encode(f"{answer.strip()} ", bos=False, eos=True)
        return ids + self.encode(f"{B_INST} {turns[-1][0].strip()} {E_INST}", bos=True)


def _turns(messages: Sequence[dict], finished: bool) -> list[tuple[str, str]]:
    """(user, assistant) pairs, the system prompt folded into the first user turn as Llama 2 does.

    A dialog for generation (`finished=False`) ends with a user turn, whose answer is returned as "".
    """
    msgs = [dict(m) for m in messages]
    for i, m in enumerate(msgs):
        if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise KubellamaError(f"message {i}: needs a role (system, user or assistant) and a string content")
    if msgs and msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise KubellamaError("a system message must be followed by a user message")
        sys_text = msgs[0]["content"].strip()
        msgs = [{"role": "user", "content": B_SYS + sys_text + E_SYS + msgs[1]["content"].strip()}] + msgs[2:]
    roles = [m["role"] for m in msgs]
    want = ["user", "assistant"] * ((len(msgs) + 1) // 2)
    if not msgs or roles != want[:len(msgs)]:
        raise KubellamaError(f"dialog roles must alternate user/assistant after an optional system, got {roles}")
    if finished and roles[-1] != "assistant":
        raise KubellamaError("a training dialog must end with an assistant message")
    if not finished and roles[-1] != "user":
        raise KubellamaError("a prompt dialog must end with a user message")
    texts = [m["content"] for m in msgs] + ([""] if not finished else [])
    return list(zip(texts[::2], texts[1::2]))
