"""Per-document work in worker processes. Kept light on imports (no fsspec, no config): every worker imports it."""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.data_prep.clean import band_keys, clean_batch

_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(model_path: str) -> Tokenizer:
    """The tokenizer in a local file, loaded once per worker process."""
    tok = _TOKENIZERS.get(model_path)
    if tok is None:
        with open(model_path, "rb") as f:
            tok = _TOKENIZERS[model_path] = Tokenizer(model_bytes=f.read())
    return tok


def _encode(texts: list[str], model_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BOS + ids + EOS of each text, concatenated; per-text token counts (BOS and EOS included) and UTF-8 bytes."""
    tok = _tokenizer(model_path)
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
    nbytes = np.fromiter((len(t.encode()) for t in texts), dtype=np.int64, count=len(texts))
    return out, lengths, nbytes


def encode_docs(texts: list[str], model_path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """BOS + ids + EOS of each text, concatenated; per-text token counts (BOS and EOS included); UTF-8 bytes."""
    out, lengths, nbytes = _encode(texts, model_path)
    return out, lengths, int(nbytes.sum())


def encode_tagged(batch: list[tuple[Any, str]], model_path: str) -> tuple[list[Any], tuple]:
    return [tag for tag, _ in batch], encode_docs([text for _, text in batch], model_path)


def prepare_batch(batch: list[tuple[int, str]], o: dict[str, Any], model_path: str) -> dict[str, Any]:
    """Everything a data prep worker does to a batch of (document id, text), in one pass: clean, scrub, filter,
    hash, MinHash and band keys, and tokenize the documents that pass the filters (each document is tokenized once,
    before global dedup decides; the dropped ones are never packed).

    Returns per document: `reasons` (None = kept); per kept document (in batch order): `docs`, `hashes`, `lengths`,
    `bytes`, `has_sig`; `tokens` (concatenated), `sigs` and `keys` (for the kept documents with a signature);
    `pii` counts.
    """
    res = clean_batch([text for _, text in batch], o)
    kept = [i for i, r in enumerate(res["reasons"]) if r is None]
    ids = np.array([batch[i][0] for i in kept], dtype=np.uint64)
    if kept:
        tokens, lengths, nbytes = _encode([res["texts"][i] for i in kept], model_path)
    else:
        tokens, lengths, nbytes = np.zeros(0, dtype=np.uint32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    has_sig = res["has_sig"][kept]
    sigs = res["sigs"][kept][has_sig]
    keys = band_keys(sigs, o["minhash_bands"]) if o["dedup_near"] else np.zeros((len(sigs), 0), np.uint64)
    return {"reasons": res["reasons"], "pii": res["pii"], "docs": ids, "hashes": res["hashes"][kept],
            "lengths": lengths, "bytes": nbytes, "tokens": tokens, "has_sig": has_sig, "sigs": sigs, "keys": keys}
