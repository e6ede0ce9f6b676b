"""One model under evaluation: loaded from any checkpoint kind, scoring continuations and generating answers.

Items are spread over the launcher's ranks and gathered back on every rank. Generation (core/model/generate.py) is
a collective under several ranks, so every rank runs the same number of batches, short shares padded with a
repeated prompt whose output is dropped.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.model.generate import derive_seed, generate
from kubellama.components.core.model.hf import load_hf
from kubellama.components.core.train import checkpoint, dist
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.safety_eval import DecodingConfig

T = TypeVar("T")
R = TypeVar("R")


def dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in table:
        raise KubellamaError(f"safety_eval.mixed_precision={mixed_precision!r}: expected auto, fp32, bf16 or fp16")
    return table[mixed_precision]


def source(url: str) -> tuple[str, str]:
    """(kind, URL) of the weights to evaluate: a stage output's HF export first (it carries its config and
    tokenizer), else what checkpoint.resolve finds (an HF directory or the newest complete DCP step)."""
    hf = storage.join(url, "hf")
    if storage.exists(storage.join(hf, "config.json")) and storage.is_complete(hf):
        return "hf", hf
    return checkpoint.resolve(url)


def tokenizer_url(url: str, src: str, data: str) -> str:
    candidates = [storage.join(src, "tokenizer.model"), storage.join(url, "hf", "tokenizer.model")]
    if data:
        candidates.append(storage.join(data, "tokenizer.model"))
    found = next((c for c in candidates if storage.exists(c)), None)
    if found is None:
        raise KubellamaError(f"{url}: no tokenizer.model beside the weights, in its hf/ export or in the data prep "
                             f"output ({data or 'safety_eval.data is empty'})")
    return found


def spread(items: Sequence[T], fn: Callable[[list[T]], list[R]], batch: int, env: dist.Env) -> list[R]:
    """`fn` over `items` in batches, shared by the ranks (every rank runs the same number of calls), gathered in
    order on every rank."""
    W, rank = env.world_size, env.rank
    mine = list(items[rank::W])
    calls = math.ceil(math.ceil(len(items) / W) / batch) if items else 0
    out: list[R] = []
    for c in range(calls):
        chunk = mine[c * batch:(c + 1) * batch]
        real = len(chunk)
        if W > 1 and real < batch:
            # Collectives inside `fn` need every rank's call: fill up with a repeat whose result is dropped.
            chunk = chunk + [items[0]] * (batch - real)
        if chunk:
            out += fn(chunk)[:real]
    if W == 1:
        return out
    gathered: list[Any] = [None] * W
    tdist.all_gather_object(gathered, out)
    merged: list[R] = [None] * len(items)  # type: ignore[list-item]
    for r, part in enumerate(gathered):
        merged[r::W] = part
    return merged


def prompt_seed(seed: int, tag: str, text: str) -> int:
    """The sampling seed of one prompt: from the decoding seed and a hash of (benchmark, prompt text)."""
    h = hashlib.sha256(f"{tag}\n{text}".encode()).digest()
    return derive_seed(seed, int.from_bytes(h[:4], "big"), int.from_bytes(h[4:8], "big"))


class Runner:
    def __init__(self, name: str, url: str, model_cfg: ModelConfig, data: str, mixed_precision: str,
                 decoding: DecodingConfig, chat: bool, env: dist.Env):
        self.name, self.url, self.decoding, self.chat, self.env = name, url, decoding, chat, env
        self.kind, self.src = source(url)
        dtype = dtype_for(mixed_precision, env.device)
        if self.kind == "hf":
            model, self.model_cfg, _ = load_hf(self.src, env.device, dtype)
        else:
            model, self.model_cfg = checkpoint.load_model(self.src, model_cfg), model_cfg
            model = model.to(device=env.device, dtype=dtype)
        self.model = model.eval()
        self.tok = Tokenizer(tokenizer_url(url, self.src, data))
        if self.tok.vocab_size > self.model_cfg.vocab_size:
            raise KubellamaError(f"{url}: tokenizer has {self.tok.vocab_size} pieces, the model only "
                                 f"{self.model_cfg.vocab_size}")

    # --- likelihoods ------------------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Ids of context + continuation and where the continuation's tokens start. The pair is encoded as one
        text (so the boundary tokenizes as it would in running text); the continuation is what follows the longest
        common prefix with the context's own ids. Too long: the context is cut from the left."""
        full = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        start = next((i for i, (a, b) in enumerate(zip(full, ctx)) if a != b), min(len(full), len(ctx)))
        start = min(start, len(full) - 1)
        limit = self.model_cfg.max_seq_len
        if len(full) > limit:
            cut = len(full) - limit
            if cut >= start:
                raise KubellamaError(f"an answer of {len(full) - start} tokens does not fit the model's "
                                     f"max_seq_len={limit}")
            full, start = full[cut:], start - cut
        return full, max(start, 1)

    @torch.no_grad()
    def _logliks(self, seqs: list[tuple[list[int], int]]) -> list[float]:
        L = max(len(ids) for ids, _ in seqs)
        tokens = torch.zeros(len(seqs), L, dtype=torch.long, device=self.env.device)
        for i, (ids, _) in enumerate(seqs):
            # Right padding: causal attention never lets a real token see the padding after it.
            tokens[i, :len(ids)] = torch.tensor(ids, device=self.env.device)
        logp = self.model(tokens).float().log_softmax(-1)
        out = []
        for i, (ids, start) in enumerate(seqs):
            targets = tokens[i, start:len(ids)]
            out.append(float(logp[i, start - 1:len(ids) - 1].gather(-1, targets[:, None]).sum()))
        return out

    def logliks(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation given its context."""
        seqs = [self.encode_pair(c, x) for c, x in pairs]
        return spread(seqs, self._logliks, self.decoding.batch_size, self.env)

    # --- generation -------------------------------------------------------------------------------------------

    def prompt_ids(self, text: str, max_new_tokens: int) -> list[int]:
        ids = (self.tok.encode_dialog_prompt([{"role": "user", "content": text}]) if self.chat
               else self.tok.encode(text))
        room = self.model_cfg.max_seq_len - max_new_tokens
        if room < 2:
            raise KubellamaError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"max_seq_len={self.model_cfg.max_seq_len}")
        # Too long: keep BOS and the end of the prompt, which the answer continues.
        return ids if len(ids) <= room else [ids[0], *ids[len(ids) - room + 1:]]

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None, tag: str = "") -> list[str]:
        """One sampled answer per prompt at the configured temperature and top-p. Each prompt is seeded by
        (decoding seed, its benchmark `tag` and text), so its answer does not depend on the batch size, the world
        size or where it sits in the list."""
        n = max_new_tokens or self.decoding.max_new_tokens
        d = self.decoding

        def run(chunk: list[tuple[list[int], int]]) -> list[str]:
            out = generate(self.model, [ids for ids, _ in chunk], n, temperature=d.temperature, top_p=d.top_p,
                           eos_id=self.tok.eos_id, seeds=[s for _, s in chunk])
            return [self.tok.decode([t for t in ids if t != self.tok.eos_id]).strip() for ids in out]

        items = [(self.prompt_ids(p, n), prompt_seed(d.seed, tag, p)) for p in prompts]
        return spread(items, run, d.batch_size, self.env)

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
