"""Llama 2 in plain PyTorch, readable in one sitting.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary embeddings, grouped-query attention through SDPA, untied output head.
Parameter names follow Hugging Face's LlamaForCausalLM (without its `model.` prefix) and RoPE uses its rotate-half
layout, so HF checkpoints load with a prefix rename and nothing else (core/model/hf.py).

Parallelism lives elsewhere (core/train/trainer.py shards `layers[i]` with FSDP2); this file knows nothing of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kubellama.components.core.model import attention
from kubellama.conf.schema.model import ModelConfig

# Rows of fp32 logits handled at a time by the fused loss: small enough to stay in cache (and, on CPU, below
# malloc's mmap threshold, so no fresh pages each step), big enough that a GPU launches few kernels.
LOSS_CHUNK_BYTES = {"cpu": 8 << 20}
LOSS_CHUNK_BYTES_DEFAULT = 256 << 20


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` against `targets`, with the gradient of the logits formed in the
    forward pass, chunk by chunk, in place of the logits themselves.

    The unfused path (logits, `.float()`, log-softmax, NLL, and their backward) makes five or six full passes over
    fp32 tensors of tokens x vocabulary. Here the logits are written once in the compute dtype, each chunk of rows
    is turned into softmax - one-hot in fp32 while in cache, and backward is two matrix products. Numerically it is
    the unfused path: logits rounded to the compute dtype, softmax and loss in fp32, the logits' gradient rounded to
    the compute dtype before the products.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        n = h.shape[0]
        grad = torch.mm(h, weight.t())  # the logits, overwritten below by their gradient
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            chunk, t = grad[start:start + rows], targets[start:start + rows]
            keep = (t >= 0)[:, None]  # a negative target (the labels' IGNORE) carries no loss
            t = t.clamp(min=0)[:, None]
            z = chunk.float()
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            loss += ((lse - z.gather(1, t)) * keep).sum()
            z.sub_(lse).exp_().scatter_add_(1, t, torch.full_like(lse, -1.0)).mul_(keep)
            chunk.copy_(z)
        ctx.save_for_backward(h, weight, grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        h, weight, grad = ctx.saved_tensors
        scale = grad_loss.to(grad.dtype)
        grad_h = torch.mm(grad, weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad.t(), h).mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """sum over rows of cross_entropy(h @ weight.T, targets) (negative targets excluded): (N, D), (V, D), (N,)."""
    rows = chunk_rows or LOSS_CHUNK_BYTES.get(h.device.type, LOSS_CHUNK_BYTES_DEFAULT) // (4 * weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, max(1, rows))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype: bf16 variance loses too much precision. F.rms_norm is one
        # fused kernel where the spelled-out form is five.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, T, head_dim) for integer positions (B, T). Computed per call: it is tiny next to
    the matmuls and keeps the model free of buffers that meta-device init and FSDP would have to re-materialise."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Rotary(torch.autograd.Function):
    """x·cos + rotate_half(x)·sin, with rotate_half(x) = [-x2, x1] (Hugging Face's layout), in three kernels and
    no temporaries, forward and backward; backward keeps only the tables, not x. The spelled-out form costs six
    kernels and three temporaries each way, on the largest activations of attention."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        out = grad * cos
        out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return out, None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x: through the autograd Function when a backward will follow, else the bare kernels (decoding
    calls this per layer and token, where the Function's bookkeeping is a visible share)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding: (layers, B, kv_heads, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor
    # Which cached positions hold real tokens (False for left padding): (B, max_len).
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        kv = cfg.n_kv_heads or cfg.n_heads
        shape = (cfg.n_layers, batch, kv, max_len, cfg.dim // cfg.n_heads)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.ones(batch, max_len, dtype=torch.bool, device=device))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        # q, k and v weights as rows of one tensor (`Llama.fuse_projections`), or None.
        self.qkv: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: attention.Mask | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        # RoPE on the (B, T, heads, head_dim) layout the projections produce (contiguous), then heads first for SDPA.
        cos, sin = cos[:, :, None], sin[:, :, None]
        if self.qkv is not None:
            # One product for q, k and v, and one rotation for the q and k heads together.
            qkv = F.linear(x, self.qkv).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
            qk = rotary(qkv[:, :, :self.n_heads + self.n_kv], cos, sin)
            q, k = qk[:, :, :self.n_heads].transpose(1, 2), qk[:, :, self.n_heads:].transpose(1, 2)
            v = qkv[:, :, self.n_heads + self.n_kv:].transpose(1, 2)
        else:
            q = rotary(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
            k = rotary(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]
            q = q.to(k.dtype)  # the cache may be wider than the weights (fp32 on CPU: generate.py)
            if T == 1:
                # Decoding: the query heads that share a KV head become that head's query rows (transformers'
                # trick), so SDPA runs one small product per KV head with no GQA expansion. `mask` is (B, 1, 1, S).
                out = F.scaled_dot_product_attention(q.view(B, self.n_kv, -1, self.head_dim), k, v, attn_mask=mask)
                return self.o_proj(out.reshape(B, 1, -1).to(x.dtype))
        # Grouped-query attention inside SDPA: each KV head serves n_heads / n_kv query heads without copying K and V
        # n_heads / n_kv times (and summing their gradients back in backward).
        gqa = self.n_kv != self.n_heads
        if isinstance(mask, attention.BlockMask):  # packed rows on GPU: the fused document-mask kernel
            out = attention.flex(q, k, v, mask, gqa)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        # gate and up weights as rows of one tensor (`Llama.fuse_projections`), or None.
        self.gate_up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: attention.Mask | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}")
        if cfg.n_heads % (cfg.n_kv_heads or cfg.n_heads):
            raise ValueError(f"model.n_heads={cfg.n_heads} is not a multiple of model.n_kv_heads={cfg.n_kv_heads}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.init_std
        # Residual-branch outputs are scaled down by depth (GPT-2 / torchtitan) so the residual stream's variance
        # does not grow with the number of layers.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def fuse_projections(self) -> Llama:
        """For inference: the q, k, v weights of each block become views into one tensor, and so do gate and up,
        so each group is one matrix product (decoding on CPU spends much of each small product on fixed costs).
        No memory is added, parameter names and `state_dict` are unchanged, and `load_state_dict` copies into the
        views, so the fused tensors follow. Not for training or FSDP (parameters that are views)."""
        for block in self.layers:
            for owner, names, attr in ((block.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv"),
                                       (block.mlp, ("gate_proj", "up_proj"), "gate_up")):
                linears = [getattr(owner, n) for n in names]
                fused = torch.cat([m.weight for m in linears])
                for m, w in zip(linears, fused.split([m.weight.shape[0] for m in linears])):
                    m.weight = nn.Parameter(w, requires_grad=False)
                setattr(owner, attr, fused)
        return self

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                segments: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                last: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for `tokens` (B, T).

        positions: (B, T) RoPE positions; default 0..T-1 (or continuing the cache).
        cache: decode incrementally, appending to and attending over the cache.
        segments: (B, T) example ids of packed sequences; attention stays inside each example.
        targets: (B, T) the next token at each position (negative: none); the summed cross-entropy is returned
            instead of the logits, through the fused head and loss (`LinearCrossEntropy`).
        last: only the last position's logits (B, 1, vocab), all a prefill samples from: the head over the whole
            prompt would cost T times as much.
        """
        _B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            # One row that broadcasts over the batch: RoPE tables are then computed once, not B times.
            positions = torch.arange(start, start + T, device=tokens.device)[None]
        mask = None
        if cache is not None and T == 1:
            # One new token per row sees every real token so far (itself included).
            mask = cache.valid[:, None, None, :start + 1]
        elif cache is not None:
            q_pos = torch.arange(start, start + T, device=tokens.device)
            k_pos = torch.arange(start + T, device=tokens.device)
            causal = k_pos[None, :] <= q_pos[:, None]
            # A padding query sees only itself: a row with no visible key would give NaN, and NaN keys poison the
            # cache even where they are masked (0 · NaN = NaN).
            mask = ((causal[None] & cache.valid[:, None, :start + T]) | (k_pos[None, :] == q_pos[:, None])[None])[:, None]
        elif segments is not None:
            mask = attention.document_mask(segments)
        h = self.embed_tokens(tokens)
        cos, sin = rope(positions, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length = start + T
        if last:
            h = h[:, -1:]
        h = self.norm(h)
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return self.lm_head(h)


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count, built on the meta device so 70B costs no memory."""
    with torch.device("meta"):
        model = Llama(cfg)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N for the matmuls plus attention scores and values
    (PaLM appendix B: 12·layers·dim·seq_len), embedding lookups excluded."""
    n = count_params(cfg) - cfg.vocab_size * cfg.dim
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.dim * seq_len
