"""Document cleaning: Unicode normalisation, PII scrubbing, quality filters, exact and near-duplicate removal.

`clean_batch` is the per-document work of the worker processes; dedup is global and partitioned (MinHash band keys
by key range, one reducer per partition, union-find over the confirmed pairs: docs/stages/data-prep.md,
"Beyond one machine"), so memory is bounded by a partition. `RecordCleaner` applies what fits to whole SFT and preference records.
"""
from __future__ import annotations

import hashlib
import json
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
            def card(m: re.Match[str], placeholder: str = placeholder) -> str:
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


def uniq(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values. np.unique hashes plain integer arrays, several times slower than sorting (numpy 2.4)."""
    s = np.sort(x, axis=None)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


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
    h = uniq(h)
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


# --- keys, partitions, global dedup --------------------------------------------------------------------------

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
EXACT = np.dtype([("hash", "<u8"), ("doc", "<u8")])
# `ref` locates the document's signature: worker << 40 | row in that worker's signature file.
NEAR = np.dtype([("key", "<u8"), ("doc", "<u8"), ("ref", "<u8"), ("band", "<u2")])


def mix64(x: Any) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the whole output."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping multiplication is the point
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """uint64[n, bands]: one bucket key per band of each MinHash signature (uint32[n, perm]), salted by the band."""
    n, perm = sigs.shape
    rows = sigs.reshape(n, bands, perm // bands).astype(np.uint64)
    h = np.repeat(mix64(np.arange(1, bands + 1, dtype=np.uint64) * _GOLD)[None, :], n, axis=0)
    for j in range(rows.shape[2]):
        h = mix64(h * _GOLD + rows[:, :, j])
    return h


def part_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition (0..parts-1) of uniformly spread 64-bit keys: equal key ranges."""
    return ((np.asarray(keys, dtype=np.uint64) >> np.uint64(32)) * np.uint64(parts) >> np.uint64(32)).astype(np.int64)


def group_of(docs: np.ndarray, seed: int, groups: int) -> np.ndarray:
    """The pack group of each document id: a pseudo-random function of the id and the seed, nothing else."""
    salt = mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    return (mix64(np.asarray(docs, dtype=np.uint64) ^ salt) % np.uint64(max(1, groups))).astype(np.int64)


def exact_duplicates(recs: np.ndarray) -> np.ndarray:
    """Sorted ids of the documents (EXACT records) whose hash a document with a lower id has too."""
    order = np.lexsort((recs["doc"], recs["hash"]))
    h, d = recs["hash"][order], recs["doc"][order]
    return np.sort(d[1:][h[1:] == h[:-1]])


def candidate_pairs(recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, ref_a, ref_b): the distinct document pairs (a < b) worth comparing among NEAR records.

    Records sharing (band, key) form a bucket, and every document stays in it; each document is paired with the
    bucket's first (lowest id) and with its predecessor, so a bucket of k costs 2k comparisons, not k^2, and
    union-find over confirmed pairs still joins chains of near duplicates.
    """
    empty = np.zeros(0, dtype=np.uint64)
    if len(recs) < 2:
        return empty, empty, empty, empty
    s = recs[np.lexsort((recs["doc"], recs["key"], recs["band"]))]
    n = len(s)
    start = np.ones(n, dtype=bool)
    start[1:] = (s["band"][1:] != s["band"][:-1]) | (s["key"][1:] != s["key"][:-1])
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    j = np.flatnonzero(~start)
    chain = j[j - 1 != first[j]]
    pairs = np.zeros(len(j) + len(chain), dtype=[("a", "<u8"), ("b", "<u8")])
    pairs["a"] = np.concatenate([s["doc"][first[j]], s["doc"][chain - 1]])
    pairs["b"] = np.concatenate([s["doc"][j], s["doc"][chain]])
    pairs = np.unique(pairs)
    docs, at = np.unique(s["doc"], return_index=True)
    refs = s["ref"][at]
    return (pairs["a"], pairs["b"], refs[np.searchsorted(docs, pairs["a"])],
            refs[np.searchsorted(docs, pairs["b"])])


def similar(sig_a: np.ndarray, sig_b: np.ndarray, threshold: float) -> np.ndarray:
    """Per row pair: do the signatures agree on at least `threshold` of their rows (estimated Jaccard)?"""
    return (sig_a == sig_b).mean(axis=1) >= threshold


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over the edges (a[i], b[i]): (nodes, root) with every node's cluster named by its lowest id."""
    nodes, inv = np.unique(np.concatenate([a, b]).astype(np.uint64), return_inverse=True)
    ia, ib = inv[:len(a)], inv[len(a):]
    parent = np.arange(len(nodes))
    while True:
        ra, rb = parent[ia], parent[ib]
        if np.array_equal(ra, rb):
            return nodes, nodes[parent]
        lo = np.minimum(ra, rb)
        # parent[x] <= x throughout, so each cluster's root ends up its lowest member.
        np.minimum.at(parent, ra, lo)
        np.minimum.at(parent, rb, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


# --- whole records ---------------------------------------------------------------------------------------------

class RecordCleaner:
    """Pretraining's cleaning where it fits whole records (SFT dialogs, preference pairs).

    Applied: every string value is normalised (data.clean.normalize), stripped of control characters and scrubbed of
    PII; a record identical to an earlier one after that is dropped (`dup_exact`). Not applied: quality filters (a
    two-word answer is a good answer) and near dedup (dialogs sharing a long system prompt, or templated safety
    refusals to different prompts, would collapse into one).
    """

    APPLIED = ("normalize", "pii", "dedup_exact")

    def __init__(self, o: dict[str, Any]):
        self.o = o
        self.pii: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.kept = 0
        self._seen: set[bytes] = set()

    def _clean(self, value: Any, pii: Counter[str]) -> Any:
        if isinstance(value, str):
            if self.o["normalize"]:
                value = unicodedata.normalize(self.o["normalize"], value)
            value = _CONTROL.sub("", value)
            return scrub_pii(value, pii) if self.o["pii"] else value
        if isinstance(value, dict):
            return {k: self._clean(v, pii) for k, v in value.items()}
        if isinstance(value, list):
            return [self._clean(v, pii) for v in value]
        return value

    def __call__(self, rec: dict) -> dict | None:
        """The cleaned record, or None when it is dropped."""
        pii: Counter[str] = Counter()
        rec = self._clean(rec, pii)
        if self.o["dedup_exact"]:
            key = hashlib.blake2b(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode(),
                                  digest_size=16).digest()
            if key in self._seen:
                self.dropped["dup_exact"] += 1
                return None
            self._seen.add(key)
        self.kept += 1
        self.pii.update(pii)  # what the kept records had
        return rec

    def summary(self) -> dict[str, Any]:
        applied = [a for a in self.APPLIED if self.o[a]]
        return {"applied": applied, "kept": self.kept, "dropped": dict(self.dropped),
                "pii": {k: self.pii.get(k, 0) for k in ("email", "phone", "ip", "card")}}
