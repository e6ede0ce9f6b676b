"""Document cleaning: Unicode normalisation, PII scrubbing, quality filters, exact and near-duplicate removal.

`clean_batch` is the per-document work and runs in worker processes; `Deduper` keeps the corpus-wide state
(document hashes, MinHash LSH buckets) in the main process. That state is compact on purpose (numpy hash tables,
signatures spilled to a local file) so memory stays nearly flat as the corpus grows.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from typing import Any

import numpy as np

# PII patterns, most specific first so an IP address is not read as a phone number.
PII: list[tuple[str, re.Pattern[str], str]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b"), "<EMAIL>"),
    ("ip", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
                      r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"), "<IP_ADDRESS>"),
    # 13-19 digits, optionally grouped by spaces or dashes; confirmed with the Luhn checksum below.
    ("card", re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), "<CARD_NUMBER>"),
    # Not inside a longer run of digit groups (order numbers, dates written with spaces).
    ("phone", re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}\b(?![ .-]?\d)"),
     "<PHONE>"),
]

_WORD = re.compile(r"\w+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SHINGLE_MUL = np.uint64(0x100000001B3)


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str, counts: Counter[str]) -> str:
    for kind, pattern, placeholder in PII:
        if kind == "card":
            def card(m: re.Match[str]) -> str:
                if luhn(re.sub(r"\D", "", m.group(0))):
                    counts["card"] += 1
                    return placeholder
                return m.group(0)

            text = pattern.sub(card, text)
            continue
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] += n
    return text


def quality_reason(text: str, o: dict[str, Any]) -> str | None:
    """Why a (normalised) document is dropped, or None to keep it (`o`: the data.clean config as a dict)."""
    n = len(text)
    if n < o["min_chars"]:
        return "too_short"
    if n > o["max_chars"]:
        return "too_long"
    letters = sum(1 for c in text if c.isalpha())
    if letters < o["min_alpha_ratio"] * len(text.replace(" ", "")):
        return "low_alpha"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 4 and 1 - len(set(lines)) / len(lines) > o["max_dup_line_ratio"]:
        return "repetitive"
    return None


_PERMS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _perms(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if (n, seed) not in _PERMS:
        rng = np.random.default_rng(seed)
        a = rng.integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
        b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
        _PERMS[(n, seed)] = (a[:, None], b[:, None])
    return _PERMS[(n, seed)]


def minhash(text: str, perm: int, shingle: int, seed: int) -> np.ndarray | None:
    """MinHash signature (uint32[perm]) over lower-cased word n-grams; None for a text without words.

    Each permutation is a multiply-shift hash of the 64-bit shingle hash, which is universal enough for MinHash
    and vectorises in numpy (uint64 arithmetic wraps).
    """
    words = _WORD.findall(text.lower())
    if not words:
        return None
    k = min(shingle, len(words))
    wh = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    n = len(words) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):
        h = h * _SHINGLE_MUL + wh[j:j + n]
    h = np.unique(h)
    a, b = _perms(perm, seed)
    sig = np.full(perm, np.iinfo(np.uint32).max, dtype=np.uint64)
    for start in range(0, len(h), 2048):  # bounded (perm x 2048) temporaries for long documents
        block = (a * h[None, start:start + 2048] + b) >> np.uint64(32)
        np.minimum(sig, block.min(axis=1), out=sig)
    return sig.astype(np.uint32)


def clean_batch(texts: list[str], o: dict[str, Any]) -> dict[str, Any]:
    """Clean a batch of documents (`o`: the data.clean config as a dict, plus `seed`).

    Returns kept texts (None where dropped), drop reasons, PII counts, exact hashes and MinHash signatures.
    """
    near, perm = o["dedup_near"], o["minhash_perm"]
    out_texts: list[str | None] = []
    reasons: list[str | None] = []
    pii: Counter[str] = Counter()
    hashes = np.zeros(len(texts), dtype=np.uint64)
    sigs = np.zeros((len(texts), perm if near else 0), dtype=np.uint32)
    has_sig = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        if o["normalize"]:
            text = unicodedata.normalize(o["normalize"], text)
        text = _CONTROL.sub("", text).strip()
        if o["pii"]:
            text = scrub_pii(text, pii)
        reason = quality_reason(text, o)
        reasons.append(reason)
        out_texts.append(None if reason else text)
        if reason:
            continue
        hashes[i] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        if near:
            sig = minhash(text, perm, o["shingle"], o["seed"])
            if sig is not None:
                sigs[i], has_sig[i] = sig, True
    return {"texts": out_texts, "reasons": reasons, "pii": dict(pii), "hashes": hashes, "sigs": sigs,
            "has_sig": has_sig}


class IntTable:
    """Open-addressing hash table of non-zero integer keys to int32 values in two numpy arrays (~12 B a slot)."""

    def __init__(self, capacity: int = 1 << 14, key_dtype: Any = np.uint64):
        self.keys = np.zeros(capacity, dtype=key_dtype)
        self.vals = np.full(capacity, -1, dtype=np.int32)
        self.bits = np.iinfo(key_dtype).bits
        self.size = 0

    def _slot(self, key: int) -> int:
        mask = len(self.keys) - 1
        i = ((key * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 24 & mask
        keys = self.keys
        while True:
            k = int(keys[i])
            if k == 0 or k == key:
                return i
            i = (i + 1) & mask

    def _key(self, key: int) -> int:
        return (key & ((1 << self.bits) - 1)) or 1

    def get(self, key: int) -> int:
        """The value stored for `key`, or -1."""
        key = self._key(key)
        i = self._slot(key)
        return int(self.vals[i]) if int(self.keys[i]) == key else -1

    def get_or_put(self, key: int, value: int) -> int:
        """The value stored for `key`, or -1 after storing `value` for it."""
        key = self._key(key)
        i = self._slot(key)
        if int(self.keys[i]) == key:
            return int(self.vals[i])
        self.keys[i], self.vals[i] = key, value
        self.size += 1
        if self.size * 2 > len(self.keys):
            self._grow()
        return -1

    def _grow(self) -> None:
        keys, vals = self.keys[self.keys != 0], self.vals[self.keys != 0]
        self.keys = np.zeros(len(self.keys) * 2, dtype=self.keys.dtype)
        self.vals = np.full(len(self.keys), -1, dtype=np.int32)
        for k, v in zip(keys.tolist(), vals.tolist()):
            i = self._slot(k)
            self.keys[i], self.vals[i] = k, v

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes


class Deduper:
    """Corpus-wide exact and near-duplicate detection (MinHash LSH with candidate verification).

    Bands of `perm / bands` signature rows index 32-bit bucket keys; a document sharing a bucket with an earlier
    one is a candidate, confirmed when the signatures agree on at least `threshold` of their rows (the estimated
    Jaccard similarity). Signatures go to a local file and are read back only for candidates.
    """

    def __init__(self, sig_path: str, perm: int, bands: int, threshold: float, exact: bool, near: bool):
        if near and perm % bands:
            raise ValueError(f"minhash_perm ({perm}) must be a multiple of minhash_bands ({bands})")
        self.exact, self.near = exact, near
        self.perm, self.bands, self.threshold = perm, bands, threshold
        self.seen = IntTable()
        self.buckets = IntTable(key_dtype=np.uint32)
        self.sig_file = open(sig_path, "w+b")
        self.n = 0
        rows = perm // bands if near else 1
        self._mix = (np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64)).astype(np.uint64)

    def check(self, doc_hash: int, sig: np.ndarray | None) -> str | None:
        """'dup_exact', 'dup_near' or None (the document is new and is remembered)."""
        if self.exact and self.seen.get_or_put(int(doc_hash), 1) != -1:
            return "dup_exact"
        if not self.near or sig is None:
            return None
        keys = (sig.reshape(self.bands, -1).astype(np.uint64) * self._mix).sum(axis=1)
        keys = keys ^ (np.arange(self.bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))
        keys = (keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        keys = keys.tolist()
        candidates = {c for c in (self.buckets.get(k) for k in keys) if c != -1}
        for other in sorted(candidates):
            self.sig_file.seek(other * self.perm * 4)
            prev = np.frombuffer(self.sig_file.read(self.perm * 4), dtype=np.uint32)
            if np.mean(prev == sig) >= self.threshold:
                return "dup_near"
        for key in keys:
            self.buckets.get_or_put(key, self.n)
        self.sig_file.seek(0, 2)
        self.sig_file.write(sig.astype(np.uint32).tobytes())
        self.n += 1
        return None

    def close(self) -> None:
        self.sig_file.close()

    @property
    def nbytes(self) -> int:
        return self.seen.nbytes + self.buckets.nbytes
