"""The Llama model: masking, GQA, KV cache, packed segments, sampling, exact parameter counts, the fused loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from kubellama.components.core.data.tokenizer import IGNORE
from kubellama.components.core.model.generate import generate, sample
from kubellama.components.core.model.llama import (
    KVCache,
    Llama,
    Rotary,
    count_params,
    flops_per_token,
    linear_cross_entropy,
)
from kubellama.components.core.recipe.config import load_config
from kubellama.conf.schema.model import ModelConfig


def small(**kw) -> ModelConfig:
    base = dict(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=97, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(small()).eval()


def test_causal_future_tokens_do_not_change_past_logits(model):
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def reference_mha(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention written out with explicit softmax, no SDPA, no GQA path."""
    cfg = model.cfg
    hd = cfg.dim // cfg.n_heads
    T = tokens.shape[1]
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-b, a], -1) * sin

    def norm(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    h = model.embed_tokens.weight[tokens]
    for blk in model.layers:
        a = norm(h, blk.input_layernorm.weight)
        q = (a @ blk.self_attn.q_proj.weight.T).view(1, T, cfg.n_heads, hd).transpose(1, 2)
        k = (a @ blk.self_attn.k_proj.weight.T).view(1, T, cfg.n_heads, hd).transpose(1, 2)
        v = (a @ blk.self_attn.v_proj.weight.T).view(1, T, cfg.n_heads, hd).transpose(1, 2)
        s = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, T, cfg.dim)
        h = h + o @ blk.self_attn.o_proj.weight.T
        m = norm(h, blk.post_attention_layernorm.weight)
        ff = F.silu(m @ blk.mlp.gate_proj.weight.T) * (m @ blk.mlp.up_proj.weight.T)
        h = h + ff @ blk.mlp.down_proj.weight.T
    return norm(h, model.norm.weight) @ model.lm_head.weight.T


def test_gqa_with_all_kv_heads_equals_plain_multi_head_attention():
    torch.manual_seed(1)
    m = Llama(small(n_kv_heads=4)).eval()
    x = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.allclose(m(x), reference_mha(m, x), atol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group():
    torch.manual_seed(2)
    gqa = Llama(small(n_kv_heads=2)).eval()
    mha = Llama(small(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    # Duplicating every KV head for its 2 query heads turns the GQA model into an equivalent MHA model.
    hd = 16
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.self_attn.{name}.weight"].view(2, hd, 64)
            sd[f"layers.{i}.self_attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_kv_cache_decoding_equals_full_recomputation(model):
    x = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.empty(model.cfg, 2, 14, torch.device("cpu"), torch.float32)
        parts = [model(x[:, :5], cache=cache)]
        for t in range(5, 14):
            parts.append(model(x[:, t:t + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_segments_keep_attention_inside_each_packed_example(model):
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 6 + [1] * 5])
    positions = torch.tensor([list(range(6)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, positions=positions, segments=segments)
        assert torch.allclose(out[:, :6], model(a), atol=1e-5)
        assert torch.allclose(out[:, 6:], model(b), atol=1e-5)


def test_batched_generation_with_left_padding_matches_each_prompt_alone(model):
    prompts = [[1, 5, 9, 13, 4], [1, 7]]
    batched = generate(model, prompts, 8, eos_id=None)
    for p, out in zip(prompts, batched):
        assert generate(model, [p], 8, eos_id=None)[0] == out
    assert all(len(o) == 8 for o in batched)


def test_generation_stops_at_eos(model):
    first = generate(model, [[1, 3, 4]], 6, eos_id=None)[0]
    stopped = generate(model, [[1, 3, 4]], 6, eos_id=first[2])[0]
    assert stopped == first[: first.index(first[2]) + 1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert draws == {0, 1}
    assert int(sample(logits, 0.0, 1.0, None)) == 0


@pytest.mark.parametrize("preset,expected", [
    ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320), ("llama2_70b", 68_976_648_192)])
def test_parameter_counts_match_the_released_models(preset, expected):
    assert count_params(load_config([f"model={preset}"]).model) == expected


def test_flops_per_token_is_six_n_plus_attention():
    cfg = load_config(["model=llama2_7b"]).model
    n = 6_738_415_616 - 32000 * 4096
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_head_and_loss_match_the_unfused_path(dtype, tol):
    """Loss and gradients of the fused head + cross-entropy equal logits -> float -> cross_entropy, including
    ignored targets and a last chunk shorter than the others."""
    torch.manual_seed(0)
    h = torch.randn(50, 16).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(97, 16)).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (50,))
    targets[::6] = IGNORE
    ref = F.cross_entropy((h @ w.t()).float(), targets, ignore_index=IGNORE, reduction="sum")
    ref_grads = torch.autograd.grad(2 * ref, (h, w))
    fused = linear_cross_entropy(h, w, targets, chunk_rows=7)
    grads = torch.autograd.grad(2 * fused, (h, w))
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_model_returns_the_summed_loss_given_targets(model):
    x = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[0, :5] = IGNORE
    logits = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    assert model(x, targets=targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_rotary_matches_rotate_half_and_its_gradient_is_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 5, 1, 8, dtype=torch.float64), torch.randn(1, 5, 1, 8, dtype=torch.float64)
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    assert torch.allclose(Rotary.apply(x, cos, sin), x * cos + half * sin)
    assert torch.autograd.gradcheck(Rotary.apply, (x, cos, sin))
