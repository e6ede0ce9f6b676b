"""Learning dynamics at CI scale (issue 21, item 5): real PPO (components/ppo) on a real tiny Llama, rewarded by the
world's rule (`ppo.reward=rule`), raises world accuracy on held-out prompts of one family over its init; and it does
not when the advantage's sign is flipped, nor when the rewards are shuffled across the batch. Those two breaks are
the controls: a test that passed with them would not be testing learning.

The setting is built here, small and seeded: the world's `lookup` family (a made-up creature -> its colour), a
tokenizer trained on its text, and an init fitted to answer half the creatures right and, for the other half, a
wrong colour first (50%) and the right one second (35%). So its greedy accuracy is in the 20-80% band and the right
answer is often sampled: what PPO on the rule's reward must learn is to prefer it. PPO trains on six phrasings of
the question; accuracy is measured, greedily and by the rule, on four phrasings it never trains on."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.model.hf import save_hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.core.rlhf.rule import answers, rule_reward
from kubellama.components.core.world import evaluate, rules
from kubellama.components.data_prep.pack import train_tokenizer
from kubellama.components.ppo import algo, loop
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.ppo import PpoConfig
from kubellama.conf.schema.rlhf import SamplingConfig

FAMILY = "lookup"
NAMES = sorted(rules.TABLE)
COLOURS = rules.COLOURS
TRAIN_FORMS = rules.LOOKUP_FORMS
HELD_FORMS = ("Say the colour of the {}.", "What colour does the {} have?", "Which colour has the {}?",
              "Give the colour of the {}.")
SEED = 3
# The rise a working PPO gives here is far above this (see the report of issue 21); the broken ones stay below 0.
MARGIN = 0.15
FIT_STEPS = 150


def _records(forms: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"family": FAMILY, "prompt": f.format(n), "answer": rules.TABLE[n]} for n in NAMES for f in forms]


def _decoy(name: str) -> str:
    """A fixed wrong colour per creature: the init's first answer for the creatures it gets wrong."""
    i = COLOURS.index(rules.TABLE[name])
    return COLOURS[(i + 5) % len(COLOURS)]


def _target(name: str) -> dict[str, float]:
    """The init's answer distribution: right 80% for half the creatures; for the other half wrong first."""
    right, wrong = rules.TABLE[name], _decoy(name)
    return {right: 0.8, wrong: 0.2} if NAMES.index(name) % 2 == 0 else {right: 0.35, wrong: 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """The tokenizer, the tiny model config and the init (an HF folder): fitted in a few seconds."""
    torch.manual_seed(SEED)
    root = tmp_path_factory.mktemp("learning")
    lines = [f"[INST] {f.format(n)} [/INST] {c}" for n in NAMES for f in TRAIN_FORMS + HELD_FORMS for c in COLOURS]
    tok_url = os.path.join(str(root), "tok.model")
    with open(tok_url, "wb") as f:
        f.write(train_tokenizer(lines * 4, vocab_size=700))
    tok = Tokenizer(tok_url)
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=720, max_seq_len=48)
    model = Llama(cfg)
    model.train()
    # The init: each prompt's answer distribution fitted directly (soft targets over whole answers, EOS included).
    seqs, weights, spans = [], [], []
    for rec in _records(TRAIN_FORMS + HELD_FORMS):
        name = next(n for n in NAMES if f" {n}" in rec["prompt"])
        prompt = tok.encode_dialog_prompt([{"role": "user", "content": rec["prompt"]}])
        for colour, q in _target(name).items():
            ans = tok.encode(f"{colour} ", bos=False, eos=True)
            seqs.append(prompt + ans)
            weights.append(q)
            spans.append((len(prompt), len(prompt) + len(ans)))
    T = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, a - 1:b - 1] = 1.0
    w = torch.tensor(weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(FIT_STEPS):
        logp = algo.token_logp(model(tokens), tokens)
        loss = -(w * (logp * mask).sum(-1)).sum() / len(_records(TRAIN_FORMS + HELD_FORMS))
        opt.zero_grad()
        loss.backward()
        opt.step()
    init = os.path.join(str(root), "init")
    save_hf({k: v.detach() for k, v in model.state_dict().items()}, cfg, init)
    return {"tok": tok, "cfg": cfg, "init": init, "root": root}


def _prompts(tok: Tokenizer, records: list[dict[str, str]]) -> list[Prompt]:
    return [Prompt(tok.encode_dialog_prompt([{"role": "user", "content": r["prompt"]}]), False, None, r["answer"],
                   r["family"]) for r in records]


def learn(world: dict[str, Any], name: str) -> tuple[float, float]:
    """PPO with the rule reward from the init; (held-out accuracy of the init, of the policy PPO ends with)."""
    tok = world["tok"]
    train, held = _prompts(tok, _records(TRAIN_FORMS)), _prompts(tok, _records(HELD_FORMS))
    cfg = PpoConfig(lr=3e-3, critic_lr=3e-3, max_steps=12, prompts_per_batch=36, minibatch=12, micro_batch=12,
                    sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=6), beta=0.01,
                    mixed_precision="fp32", ckpt_every=100, keep_last=1, eval_every=100, patience=0,
                    heldout_prompts=len(held), kl_max=100.0, min_length_ratio=0.0, max_empty_rate=1.0,
                    reward="rule", families=[FAMILY])
    reward = rule_reward({**answers(train, "train"), **answers(held, "held")}, tok)
    ppo = loop.Ppo(cfg, world["cfg"], os.path.join(str(world["root"]), name), train, held, reward,
                   init=world["init"], seed=SEED, eos_id=tok.eos_id)
    records = _records(HELD_FORMS)

    def accuracy() -> float:
        items = ppo.on_policy(lambda m: evaluate.task_items(m, tok, records))
        return float(evaluate.figures({"tasks": items})["accuracy"]["value"])

    before = accuracy()
    ppo.fit()
    return before, accuracy()


def test_ppo_with_the_rule_reward_raises_held_out_accuracy(world) -> None:
    before, after = learn(world, "normal")
    print(f"normal: {before:.3f} -> {after:.3f}")
    assert 0.2 <= before <= 0.8
    assert after >= before + MARGIN


def test_a_flipped_advantage_sign_does_not_raise_it(world, monkeypatch) -> None:
    gae = algo.gae

    def flipped(*args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        adv, returns = gae(*args, **kw)
        return -adv, returns

    monkeypatch.setattr(algo, "gae", flipped)
    before, after = learn(world, "flipped")
    print(f"flipped: {before:.3f} -> {after:.3f}")
    assert after < before + MARGIN


def test_rewards_shuffled_across_the_batch_do_not_raise_it(world, monkeypatch) -> None:
    make_rollout = loop.make_rollout
    gen = torch.Generator().manual_seed(SEED)

    def shuffled(policy, ref, value, batch, responses, raw, *rest):  # type: ignore[no-untyped-def]
        return make_rollout(policy, ref, value, batch, responses, raw[torch.randperm(len(raw), generator=gen)],
                            *rest)

    monkeypatch.setattr(loop, "make_rollout", shuffled)
    before, after = learn(world, "shuffled")
    print(f"shuffled: {before:.3f} -> {after:.3f}")
    assert after < before + MARGIN
