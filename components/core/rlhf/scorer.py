"""Reward models and the one way to score with them (reward training, rejection sampling, PPO, evaluation): a Llama
with a scalar head `score` instead of the LM head (paper §3.2.2), read at each right-padded dialog's last token (the
closing EOS); exported as Hugging Face's LlamaForSequenceClassification. `Scorer` batches scores on a model sharded
like training; under torch.distributed every rank calls it together, running the same number of forwards.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as tdist
from torch import nn

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.model.hf import read_config
from kubellama.components.core.model.llama import Llama, count_params
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.parallelize import FULL_INIT_MAX_PARAMS, shard_frozen
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import ComputeConfig

PAD = 0  # right padding (UNK): never read, since scores come from each sequence's own last token

# What `save_hf(..., config=CLASSIFIER)` adds so transformers builds the scalar head.
CLASSIFIER = {"architectures": ["LlamaForSequenceClassification"], "num_labels": 1, "id2label": {"0": "LABEL_0"},
              "label2id": {"LABEL_0": 0}, "pad_token_id": PAD, "problem_type": "regression"}


class RewardModel(Llama):
    """Llama with a scalar head: `forward(tokens, lengths)` gives one score per row, read at position lengths - 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # The final norm's output feeds the scalar head instead of the vocabulary projection.
        self.lm_head = nn.Identity()
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, 0.0, cfg.init_std)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,  # type: ignore[override]
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,) in fp32, each read at its row's last token: position lengths - 1 (the last column when
        `lengths` is None). The head only sees those positions."""
        h = super().forward(tokens, positions=positions, segments=segments)
        last = (lengths if lengths is not None else torch.full((tokens.shape[0],), tokens.shape[1],
                                                               device=tokens.device)) - 1
        h = h[torch.arange(tokens.shape[0], device=tokens.device), last]
        return self.score(h).squeeze(-1).float()


def build(cfg: ModelConfig, seed: int) -> RewardModel:
    """A reward model every rank builds alike: seeded weights, or the meta device for huge models (see
    trainer.build_llama)."""
    torch.manual_seed(seed)
    if count_params(cfg) <= FULL_INIT_MAX_PARAMS:
        return RewardModel(cfg)
    with torch.device("meta"):
        return RewardModel(cfg)


def encode(tok: Tokenizer, context: str | Sequence[dict], response: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids of `response` answering `context` (a prompt, or a dialog ending with a user turn) in the Llama 2
    chat format, and whether it was cut: the left end goes first, since the score is read at the right end."""
    messages = [{"role": "user", "content": context}] if isinstance(context, str) else list(context)
    ids, _ = tok.encode_dialog([*messages, {"role": "assistant", "content": response}])
    return ids[-max_len:], len(ids) > max_len


def pad(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) right-padded to the longest, lengths (B,))."""
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    tokens = torch.full((len(seqs), int(lengths.max())), PAD, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.as_tensor(s, dtype=torch.long, device=device)
    return tokens, lengths


def model_config(url: str) -> ModelConfig:
    """The shape of the reward model at `url`: an HF directory's config.json, or the model keys a training
    checkpoint's fingerprint records."""
    kind, src = checkpoint.resolve(url)
    if kind == "hf":
        return read_config(src)[1]
    fp = checkpoint.meta(src).get("fingerprint") or {}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k[len("model."):]: v for k, v in fp.items() if k.startswith("model.") and k[len("model."):] in names}
    if not fields:
        raise KubellamaError(f"{src}: records no model config (no fingerprint): pass the model config explicitly")
    return ModelConfig(**fields)


def _tokenizer_near(url: str) -> str | None:
    for c in (storage.join(url, "tokenizer.model"), storage.join(url, "hf", "tokenizer.model")):
        if storage.exists(c):
            return c
    return None


class Scorer:
    """Batched reward-model scores (raw, before the sigmoid) for token ids or (context, response) texts."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer | None = None, batch_size: int = 16,
                 max_len: int | None = None):
        self.model, self.tok, self.batch_size = model, tokenizer, max(1, batch_size)
        cfg = model.cfg  # type: ignore[union-attr]
        self.max_len = max_len or cfg.max_seq_len

    @classmethod
    def load(cls, url: str, *, tokenizer: str | None = None, model_cfg: ModelConfig | None = None,
             train_cfg: ComputeConfig | None = None, env: dist.Env | None = None, batch_size: int = 16,
             max_len: int | None = None, frozen: str = "fp32") -> Scorer:
        """Collective: the reward model at `url` (an RM stage output, one of its checkpoints, or its HF export),
        sharded over all ranks like training (`train_cfg` gives mixed precision and activation checkpointing), each
        rank reading only its own slices, held as `frozen` says (trainer.shard_frozen; "fp32": exactly as trained).
        The tokenizer defaults to the one shipped in the export."""
        env = env or dist.init()
        model = build(model_cfg or model_config(url), seed=0)
        meta = any(p.is_meta for p in model.parameters())
        model = shard_frozen(model, train_cfg or ComputeConfig(), env, frozen)  # type: ignore[assignment]
        if meta:
            model.to_empty(device=env.device)
        checkpoint.load_weights(model, url)
        tok_url = tokenizer or _tokenizer_near(url)
        return cls(model, Tokenizer(tok_url) if tok_url else None, batch_size, max_len)

    @torch.no_grad()
    def score_ids(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores (len(seqs),) on the CPU, in the order given. Collective under torch.distributed."""
        if any(len(s) == 0 for s in seqs):
            raise KubellamaError("score_ids: every sequence needs at least one token")
        device = next(self.model.parameters()).device
        # Similar lengths in one batch: less padding to compute.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        steps = torch.tensor([len(batches)], device=device)
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(steps, op=tdist.ReduceOp.MAX)
        out = torch.empty(len(seqs), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for k in range(int(steps)):
                # A rank out of sequences still runs the forward: the other ranks need its parameter shards.
                idx = batches[k] if k < len(batches) else []
                tokens, lengths = pad([seqs[i] for i in idx] or [[PAD]], device)
                scores = self.model(tokens, lengths)
                if idx:
                    out[torch.tensor(idx)] = scores.cpu()
        finally:
            self.model.train(was_training)
        return out

    def score(self, contexts: Sequence[str | Sequence[dict]], responses: Sequence[str]) -> torch.Tensor:
        """Scores of each response to its context (a prompt or a dialog ending with a user turn)."""
        if self.tok is None:
            raise KubellamaError("this scorer has no tokenizer: pass tokenizer= (a tokenizer.model URL)")
        if len(contexts) != len(responses):
            raise KubellamaError(f"score: {len(contexts)} contexts but {len(responses)} responses")
        return self.score_ids([encode(self.tok, c, r, self.max_len)[0] for c, r in zip(contexts, responses)])


def probability(scores: torch.Tensor) -> torch.Tensor:
    """R = sigmoid(score): the paper's reward in (0, 1), what the 0.15 safety threshold is applied to."""
    return torch.sigmoid(scores.float())
