"""Tokenizer training (SentencePiece BPE, Llama settings), parallel tokenization and packing into token shards."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import sentencepiece as spm

from kubellama.components.core.data.shards import ShardWriter
from kubellama.components.core.errors import KubellamaError
from kubellama.components.data_prep.parallel import WorkerPool
from kubellama.components.data_prep.work import encode_tagged

log = logging.getLogger(__name__)

# SentencePiece skips training sentences longer than this many bytes; long lines are cut below it.
MAX_SENTENCE = 4096


def training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of `texts` cut to SentencePiece's sentence limit, up to `max_chars` characters in all."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            while line:
                piece = line[:MAX_SENTENCE // 4]  # 4 bytes per character at most
                line = line[len(piece):]
                yield piece
                total += len(piece)
                if total >= max_chars:
                    return


def train_tokenizer(texts: Iterable[str], vocab_size: int, character_coverage: float = 0.99995,
                    hard_vocab_limit: bool = False, threads: int = 1, seed_chars: int = 50_000_000) -> bytes:
    """A SentencePiece BPE model with Llama 2's trainer settings; returns the serialized model."""
    out = io.BytesIO()
    lines = training_lines(texts, seed_chars)
    first = next(lines, None)
    if first is None:
        raise KubellamaError("no text to train the tokenizer on: give data.sources or data.tokenizer.model")

    def sentences() -> Iterator[str]:
        yield first
        yield from lines

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=out, model_type="bpe", vocab_size=vocab_size,
            character_coverage=character_coverage, split_digits=True, byte_fallback=True,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, split_by_unicode_script=True, split_by_number=True,
            split_by_whitespace=True, max_sentencepiece_length=16, max_sentence_length=MAX_SENTENCE,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=hard_vocab_limit,
            vocabulary_output_piece_score=True, num_threads=max(1, threads), minloglevel=2)
    except RuntimeError as exc:
        raise KubellamaError(f"tokenizer training failed: {exc}") from None
    return out.getvalue()


def model_flags(model_bytes: bytes) -> dict[str, Any]:
    """Trainer settings read back from a serialized model (what the Llama recipe requires of it)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    t = proto.trainer_spec
    return {"model_type": pb.TrainerSpec.ModelType.Name(t.model_type).lower(), "split_digits": t.split_digits,
            "byte_fallback": t.byte_fallback, "vocab_size": len(proto.pieces),
            "normalization": proto.normalizer_spec.name}


# --- main side -----------------------------------------------------------------------------------------------

class Packer:
    """Cuts a token stream into rows of seq_len and hands them to a ShardWriter; the last partial row is dropped."""

    def __init__(self, writer: ShardWriter, seq_len: int, chunk_rows: int = 1024):
        self.writer, self.seq_len, self.chunk = writer, seq_len, chunk_rows * seq_len
        self.parts: list[np.ndarray] = []
        self.buffered = 0

    def add(self, tokens: np.ndarray) -> None:
        self.parts.append(tokens)
        self.buffered += len(tokens)
        if self.buffered >= self.chunk:
            self._emit()

    def _emit(self) -> None:
        flat = np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]
        rows = len(flat) // self.seq_len
        if rows:
            self.writer.add(flat[:rows * self.seq_len])
        rest = flat[rows * self.seq_len:]
        self.parts, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> int:
        """Flush whole rows; returns the number of tail tokens dropped."""
        if self.parts:
            self._emit()
        return self.buffered


def mix_order(source: np.ndarray, weights: list[float], rng: np.random.Generator) -> np.ndarray:
    """Training order of documents given in id order with their source index: indices into them, every source
    repeated by its weight and interleaved at random in proportion.

    weight 2.5 = every document twice plus an evenly spread half once more; weight 0 leaves a source out. Each
    source keeps its own order; the interleaving is a uniformly random merge of the sources' streams (what drawing
    the next source in proportion to what each has left gives), made in one permutation.
    """
    streams = []
    for s, w in enumerate(weights):
        idx = np.flatnonzero(source == s)
        full, frac = int(w), w - int(w)
        j = np.arange(len(idx), dtype=np.float64)
        extra = idx[np.floor((j + 1) * frac) > np.floor(j * frac)]  # at j = n - 1: floor(n * frac) picks in all
        streams.append(np.concatenate([np.tile(idx, full), extra]))
    labels = rng.permutation(np.repeat(np.arange(len(streams)), [len(x) for x in streams]))
    out = np.empty(len(labels), dtype=np.int64)
    for s, stream in enumerate(streams):
        out[labels == s] = stream
    return out


def batched(texts: Iterable[Any], max_chars: int = 1 << 18) -> Iterator[list[Any]]:
    """Groups of items of about `max_chars` characters (items are strings or (tag, string) pairs)."""
    batch: list[Any] = []
    size = 0
    for item in texts:
        batch.append(item)
        size += len(item if isinstance(item, str) else item[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_and_pack(docs: Iterable[tuple[Any, str]], model_path: str, writer: ShardWriter, seq_len: int,
                      pool: WorkerPool, vocab_size: int) -> dict[str, Any]:
    """Tokenize (tag, text) documents on the pool's workers and pack them, in order, into `writer`.

    `model_path` is a local tokenizer.model. Returns token counts per tag, UTF-8 bytes, total tokens, dropped
    tail tokens and the token histogram.
    """
    packer = Packer(writer, seq_len)
    per_tag: dict[Any, int] = {}
    hist = np.zeros(vocab_size, dtype=np.int64)
    total = nbytes = docs_n = 0
    for tags, (flat, lengths, nb) in pool.map(encode_tagged, batched(docs), args=(model_path,)):
        packer.add(flat)
        hist += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        for tag, n in zip(tags, lengths.tolist()):
            per_tag[tag] = per_tag.get(tag, 0) + n
        total += len(flat)
        nbytes += nb
        docs_n += len(tags)
        if docs_n % 20000 < len(tags):
            log.info("tokenized %d documents, %d tokens", docs_n, total)
    dropped = packer.close()
    return {"tokens": total, "bytes": nbytes, "docs": docs_n, "per_tag": per_tag, "dropped_tail": dropped,
            "histogram": hist}
