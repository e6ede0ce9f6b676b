"""SentencePiece tokenizer with Llama 2's conventions: BOS=1, EOS=2, UNK=0, no pad token."""
from __future__ import annotations


import sentencepiece as spm

from components.core import storage


class Tokenizer:
    def __init__(self, url: str):
        self.url = url
        data = storage.read_bytes(url)
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.model_bytes = data
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))
