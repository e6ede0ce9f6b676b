"""Document masks for packed rows: attention stays inside each example, at full speed on GPU.

GPU: a FlexAttention `BlockMask` run by the compiled (fused) kernel, so no T × T mask exists; CPU: a dense boolean
(B, 1, T, T) mask through SDPA (FlexAttention has no CPU backward). `document_mask` picks by device (override with
KUBELLAMA_DOC_MASK=block|dense|auto); `attend` runs either. `scripts/check_attention.py --check` compares them on a GPU.
"""
from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Mask = torch.Tensor | BlockMask
MODE_ENV = "KUBELLAMA_DOC_MASK"
MODES = ("auto", "block", "dense")


def use_block_mask(device: torch.device, mode: str | None = None) -> bool:
    mode = mode or os.environ.get(MODE_ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode == "block" or (mode == "auto" and device.type == "cuda")


def dense_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: causal and inside the same example."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]


def block_mask(segments: torch.Tensor) -> BlockMask:
    """FlexAttention block mask of the same rule; built without materialising T × T on GPU (compiled)."""
    B, T = segments.shape

    def same_doc_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (segments[b, q] == segments[b, kv]) & (kv <= q)

    return create_block_mask(same_doc_causal, B, None, T, T, device=segments.device,
                             _compile=segments.is_cuda)


def document_mask(segments: torch.Tensor, mode: str | None = None) -> Mask:
    """The mask the model attends with for packed rows: a BlockMask on GPU, dense on CPU (see module doc)."""
    return block_mask(segments) if use_block_mask(segments.device, mode) else dense_mask(segments)


@cache
def _compiled_flex():
    # Eager flex_attention is a reference implementation that materialises the scores; only the compiled one is
    # the fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, gqa: bool) -> torch.Tensor:
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask, enable_gqa=gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None, gqa: bool) -> torch.Tensor:
    """Attention of (B, H, T, D) queries over keys/values with `mask`: None (causal), dense or BlockMask."""
    if isinstance(mask, BlockMask):
        return flex(q, k, v, mask, gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
