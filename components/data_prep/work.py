"""Tokenization in worker processes. Kept light on imports (no fsspec, no config): every worker imports it."""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from components.core.tokenizer import Tokenizer

_TOKENIZERS: dict[str, Tokenizer] = {}


def encode_docs(texts: list[str], model_path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """BOS + ids + EOS of each text, concatenated; per-text token counts (BOS and EOS included); UTF-8 bytes.

    The tokenizer comes from a local file, loaded once per worker process.
    """
    tok = _TOKENIZERS.get(model_path)
    if tok is None:
        with open(model_path, "rb") as f:
            tok = _TOKENIZERS[model_path] = Tokenizer(model_bytes=f.read())
    ids = tok.encode_batch(texts, bos=False, eos=False)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)) + 2
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    # Place the ids around BOS/EOS slots in one vectorised step instead of building new lists.
    out = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out[starts] = tok.bos_id
    out[ends - 1] = tok.eos_id
    body = np.ones(len(out), dtype=bool)
    body[starts] = body[ends - 1] = False
    out[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(body.sum()))
    return out, lengths, sum(len(t.encode()) for t in texts)


def encode_tagged(batch: list[tuple[Any, str]], model_path: str) -> tuple[list[Any], tuple]:
    return [tag for tag, _ in batch], encode_docs([text for _, text in batch], model_path)
