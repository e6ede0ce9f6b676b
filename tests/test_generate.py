"""generate(): every FSDP rank steps until all ranks are done; requests past max_seq_len are refused; sampling is
seeded per prompt and draws from softmax(logits / T) inside the top-p nucleus."""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
from test_trainer_support import _entry, model_cfg, train_cfg

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.model.generate import generate, sample, uniforms
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.train import dist
from kubellama.components.core.train.parallelize import consolidated, shard

MAX_NEW = 8
# Rank 0's prompt is cut short by EOS; rank 1's two prompts run to MAX_NEW.
PROMPTS = {0: [[1, 5, 9]], 1: [[1, 7], [1, 3, 4, 6]]}
# A second call where the ranks ask for different lengths.
SHORT = {0: 2, 1: 6}
# Per-prompt seeds for a sampled call: the prompts' places in the one-process batch of all three.
SEEDS = {0: [100], 1: [101, 102]}
SAMPLED = dict(temperature=1.0, top_p=0.9, eos_id=None)


def tiny() -> Llama:
    torch.manual_seed(0)
    return Llama(model_cfg()).eval()


def ranked(env: dist.Env, eos: int, dump: str) -> None:
    model = shard(tiny(), train_cfg(), env)
    result: dict = {"long": generate(model, PROMPTS[env.rank], MAX_NEW, eos_id=eos),
                    "short": generate(model, PROMPTS[env.rank], SHORT[env.rank], eos_id=None),
                    "sampled": generate(model, PROMPTS[env.rank], MAX_NEW, seeds=SEEDS[env.rank], **SAMPLED)}
    # Rank 1 asks for too much: both ranks must raise rather than rank 0 waiting in the next collective.
    too_long = [[1] * 12] if env.rank == 1 else [[1, 2]]
    try:
        generate(model, too_long, MAX_NEW)
    except KubellamaError as exc:
        result["refused"] = str(exc)
    # The rollout's consolidation (group by group, through activation checkpointing's wrappers): the full weights.
    wrapped = shard(tiny(), train_cfg(activation_checkpointing="full", ac_every=1), env)
    result["consolidated"] = consolidated(wrapped, model_cfg(), "fp32", env.device).state_dict()
    torch.save(result, f"{dump}.{env.rank}")


def spawn_within(seconds: float, fn, world: int, *args) -> None:
    """Like test_trainer_support.spawn, but a hang fails the test instead of blocking it."""
    fd, path = tempfile.mkstemp(prefix="kl-rdzv-")
    os.close(fd)
    os.remove(path)
    ctx = torch.multiprocessing.spawn(_entry, args=(world, f"file://{path}", fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {seconds} s: generate() deadlocked")


def test_ranks_finishing_at_different_steps_all_complete_and_match_one_process(tmp_path):
    ref = tiny()
    free = {r: generate(ref, PROMPTS[r], MAX_NEW, eos_id=None) for r in PROMPTS}
    # An EOS that rank 0 samples at its 2nd step and rank 1 never does.
    eos = free[0][0][1]
    assert all(eos not in out for out in free[1]), "pick other prompts: rank 1 would stop too"

    spawn_within(120, ranked, 2, eos, str(tmp_path / "out"))
    got = {r: torch.load(tmp_path / f"out.{r}") for r in PROMPTS}

    for r, prompt in PROMPTS.items():
        assert got[r]["long"] == generate(ref, prompt, MAX_NEW, eos_id=eos)
        assert got[r]["short"] == generate(ref, prompt, SHORT[r], eos_id=None)
    together = generate(ref, PROMPTS[0] + PROMPTS[1], MAX_NEW, seeds=SEEDS[0] + SEEDS[1], **SAMPLED)
    assert got[0]["sampled"] + got[1]["sampled"] == together
    assert got[0]["long"] == [free[0][0][:2]]
    assert all(len(o) == MAX_NEW for o in got[1]["long"])
    assert "max_seq_len=17" in got[1]["refused"] and "another rank" in got[0]["refused"]
    for r in PROMPTS:
        assert got[r]["consolidated"].keys() == ref.state_dict().keys()
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got[r]["consolidated"].items())


def test_length_past_max_seq_len_is_refused_in_one_line():
    model = tiny()
    limit = model.cfg.max_seq_len
    with pytest.raises(KubellamaError) as err:
        generate(model, [[1, 2], [1] * 10], limit - 9)
    assert str(err.value) == (f"prompt 1 has 10 tokens + max_new_tokens={limit - 9} = {limit + 1}, "
                              f"beyond the model's max_seq_len={limit}")
    # Exactly filling the context is allowed.
    assert len(generate(model, [[1] * 10], limit - 10, eos_id=None)[0]) == limit - 10


def test_a_seeded_prompt_samples_the_same_tokens_alone_and_in_another_batch():
    model = tiny()
    p = [1, 5, 9, 13]
    kw = dict(temperature=1.0, top_p=0.9, eos_id=None)
    alone = generate(model, [p], MAX_NEW, seeds=[42], **kw)[0]
    batch = [[1, 7], [1, 3, 4, 6, 8, 10], p, [1, 2]]
    mixed = generate(model, batch, MAX_NEW, seeds=[7, 8, 42, 9], **kw)
    assert mixed[2] == alone
    # The same prompt twice in a batch under different seeds, and again alone under each: each is its own draw.
    twice = generate(model, [p, p], MAX_NEW, seeds=[42, 43], **kw)
    assert twice[0] == alone and twice[1] != alone
    assert generate(model, [p], MAX_NEW, seeds=[43], **kw)[0] == twice[1]


def test_seed_alone_reproduces_a_batch_and_unseeded_follows_torch_manual_seed():
    model = tiny()
    batch = [[1, 7], [1, 3, 4, 6]]
    kw = dict(temperature=1.0, eos_id=None)
    assert generate(model, batch, MAX_NEW, seed=3, **kw) == generate(model, batch, MAX_NEW, seed=3, **kw)
    torch.manual_seed(11)
    a = generate(model, batch, MAX_NEW, **kw)
    torch.manual_seed(11)
    assert generate(model, batch, MAX_NEW, **kw) == a
    with pytest.raises(KubellamaError, match="2 seeds for 1 prompts"):
        generate(model, [[1]], 2, temperature=1.0, seeds=[1, 2])


DRAWS = 20_000


def _draws(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """DRAWS tokens from one row of logits, each at the uniform of its own seed (step 0)."""
    u = uniforms(range(DRAWS), 1, torch.device("cpu"))[:, 0]
    return sample(logits.expand(DRAWS, -1), temperature, top_p, u)


def test_sampler_matches_softmax_of_logits_over_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), 1.5]])
    for temperature in (0.7, 1.0, 1.3):
        counts = torch.bincount(_draws(logits, temperature, 1.0), minlength=8).double()
        p = torch.softmax(logits[0].double() / temperature, -1)
        assert counts[6] == 0
        live = p > 0
        chi2 = float(((counts[live] - DRAWS * p[live]) ** 2 / (DRAWS * p[live])).sum())
        # 6 degrees of freedom: P(chi2 > 22.5) = 0.001
        assert chi2 < 22.5, (temperature, counts.tolist(), (DRAWS * p).tolist())


def test_top_p_never_leaves_the_nucleus_and_renormalises_inside_it():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()[None]
    counts = torch.bincount(_draws(logits, 1.0, 0.75), minlength=6).double()
    # 0.4 + 0.25 = 0.65 < 0.75, so the nucleus is the first three tokens.
    assert counts[3:].sum() == 0
    expect = probs[:3].double() / probs[:3].sum()
    assert torch.allclose(counts[:3] / DRAWS, expect, atol=0.015)
    # On a real model's logits too: every sampled token lies in its row's nucleus.
    model = tiny()
    rows = model(torch.randint(0, model.cfg.vocab_size, (64, 5)))[:, -1]
    probs = torch.softmax(rows, -1)
    u = uniforms(range(64), 1, torch.device("cpu"))[:, 0]
    tok = sample(rows, 1.0, 0.5, u)
    above = (probs > probs.gather(-1, tok[:, None])).float() * probs
    assert (above.sum(-1) < 0.5).all()


def test_fused_projections_give_the_same_logits_and_follow_load_state_dict():
    model, fused = tiny(), tiny().fuse_projections()
    x = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert fused.state_dict().keys() == model.state_dict().keys()
    torch.manual_seed(1)
    other = Llama(model.cfg).eval()
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(fused(x), other(x), atol=1e-5)
    assert generate(fused, [[1, 5, 9]], 6, eos_id=None) == generate(other, [[1, 5, 9]], 6, eos_id=None)
