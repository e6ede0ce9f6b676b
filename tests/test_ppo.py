"""PPO: the math against hand-computed values, a tiny seeded run that learns a known-token reward with bounded KL,
and SIGKILL in the middle then a rerun = the uninterrupted run's weights."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from test_trainer_support import spawn

from kubellama.components.ppo import algo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kl_and_token_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    kl = algo.kl_tokens(logp, ref, mask)
    assert kl.tolist() == [[0.0, -1.0, 0.0, 0.0]]
    r = algo.token_rewards(torch.tensor([2.0]), torch.tensor([[0.0, 0.5, 0.25, 0.0]]), mask, beta=0.1)
    # -β·kl on each response token, the score added on the last one (index 2)
    assert torch.allclose(r, torch.tensor([[0.0, -0.05, 2.0 - 0.025, 0.0]]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 7.0]])  # off-mask values must not leak in
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.5
    d2 = 2.0 + g * 0.0 - 1.0  # last token: V after it is 0
    d1 = 1.0 + g * 1.0 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    adv, ret = algo.gae(rewards, values, mask, g, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 1.0, 0.0]]))


def test_whiten_over_mask_only():
    x = torch.tensor([[100.0, 1.0, 3.0], [2.0, 5.0, -50.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = algo.whiten(x, mask, eps=0.0)
    vals = torch.tensor([1.0, 3.0, 2.0, 5.0])
    expect = (vals - vals.mean()) / vals.std(unbiased=False)
    assert torch.allclose(w[mask.bool()], expect)
    assert (w[~mask.bool()] == 0).all()


def _whiten_halves(env, x: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    half = x.shape[0] // 2
    rows = slice(env.rank * half, (env.rank + 1) * half)
    torch.save(algo.whiten(x[rows], mask[rows], eps=0.0), f"{out}.{env.rank}")


def test_whiten_uses_the_statistics_of_every_rank(tmp_path):
    x = torch.tensor([[1.0, 3.0], [2.0, 5.0], [10.0, 11.0], [-4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    spawn(_whiten_halves, 2, x, mask, str(tmp_path / "w"))
    got = torch.cat([torch.load(tmp_path / f"w.{r}") for r in range(2)])
    assert torch.allclose(got, algo.whiten(x, mask, eps=0.0))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clipped, akl = algo.policy_loss(logp, old, adv, mask, clip=0.2)
    # ratio 1.5, A>0 -> min(1.5, 1.2)=1.2; ratio 0.5, A<0 -> min(-0.5, -0.8) = -0.8; ratio 1.1 -> 2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2))
    assert clipped.item() == 2
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1))
    assert akl.item() == pytest.approx(k3, rel=1e-5)


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    loss = algo.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((2-3)², (1.2-3)²) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0))


def test_entropy_of_uniform():
    logits = torch.zeros(2, 3, 8)
    assert algo.entropy(logits, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])).item() == \
        pytest.approx(3 * math.log(8), rel=1e-5)


def _run(out: str, iterations: int, kill_at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ppo_tiny.py"), out, str(iterations),
                           str(kill_at)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_ppo_learns_known_token_with_bounded_kl(tmp_path):
    from ppo_tiny import make, ppo_cfg

    torch.set_num_threads(1)
    s = make(str(tmp_path), ppo_cfg(max_steps=8, lr=1e-2)).fit()
    rewards = [r["reward"] for r in s["records"]]
    assert s["status"] == "completed" and s["iterations"] == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    held = [r["heldout_reward"] for r in s["heldout"]]
    assert held[-1] > held[0]
    assert all(abs(r["kl"]) < 5.0 for r in s["records"])
    report_keys = {"reward_first", "reward_last", "kl_last", "iterations", "stopped_early", "stop_reason"}
    assert report_keys <= set(s)


def test_rollouts_sample_the_same_answers_on_one_rank_and_on_two(tmp_path):
    from dataclasses import replace

    from ppo_tiny import make, ppo_cfg

    torch.set_num_threads(1)
    ppo = make(str(tmp_path), ppo_cfg(temperature=1.0, top_p=0.9))
    one = ppo.env
    whole = ppo.sample(1)
    # Each of two ranks samples its round-robin share, batched differently: together they are the one-rank batch.
    shares = []
    for rank in range(2):
        ppo.env = replace(one, rank=rank, world_size=2)
        shares.append(ppo.sample(1))
    ppo.env = one
    assert [p.ids for p in whole[0]] == [p.ids for i in range(8) for p in (shares[0][0][i], shares[1][0][i])]
    assert whole[1] == [r for i in range(8) for r in (shares[0][1][i], shares[1][1][i])]
    assert len(set(map(tuple, whole[1]))) > 1


def test_rollouts_in_chunks_sample_the_same_answers(tmp_path):
    from ppo_tiny import make, ppo_cfg

    torch.set_num_threads(1)
    whole = make(str(tmp_path / "a"), ppo_cfg()).sample(0)
    chunked = make(str(tmp_path / "b"), ppo_cfg(rollout_batch=3)).sample(0)  # 16 prompts: 3+3+3+3+3+1
    assert [p.ids for p in whole[0]] == [p.ids for p in chunked[0]]
    assert whole[1] == chunked[1] and len(whole[1]) == 16


def test_kl_guard_stops_before_the_update(tmp_path):
    from ppo_tiny import make, ppo_cfg

    torch.set_num_threads(1)
    # Any positive KL trips a threshold this low: the run stops at the second rollout, keeping iteration 1.
    s = make(str(tmp_path), ppo_cfg(max_steps=6, lr=1e-2, kl_max=1e-9)).fit()
    assert s["status"] == "stopped" and s["stop_reason"] == "kl_explosion" and s["stopped_early"]
    assert s["checkpoint"].endswith(f"step_{s['iterations']:07d}") and s["checkpoint"] in s["stop_message"]


def test_reward_collapse_guard_names_the_last_good_checkpoint(tmp_path):
    from ppo_tiny import ppo_cfg, prompts
    from test_trainer_support import model_cfg

    from kubellama.components.ppo.loop import Ppo

    torch.set_num_threads(1)
    calls = []

    def falling(prompt_ids, responses, safety):  # 0, then -1, -2, ...: the third rollout is 2 below the best
        calls.append(1)
        return torch.full((len(responses),), -float(len(calls) - 1), dtype=torch.float64)

    s = Ppo(ppo_cfg(max_steps=6, max_reward_drop=1.5), model_cfg(), str(tmp_path), prompts(48, 0), [], falling,
            eos_id=-1, seed=5).fit()
    assert s["stop_reason"] == "reward_collapse" and s["iterations"] == 2
    assert s["checkpoint"].endswith("step_0000002") and s["checkpoint"] in s["stop_message"]


def test_sigkill_mid_ppo_then_rerun_matches_uninterrupted(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert _run(whole, 4).returncode == 0
    killed = _run(cut, 4, kill_at=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not os.path.exists(os.path.join(cut, "final.pt"))
    again = _run(cut, 4)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "iteration 2" in again.stderr
    a = torch.load(os.path.join(whole, "final.pt"))
    b = torch.load(os.path.join(cut, "final.pt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_before_its_first_evaluation_keeps_the_iteration_0_heldout_record(tmp_path):
    """The held-out prompts are scored at iteration 0; a run that dies after a checkpoint but before the first
    `eval_every` iteration (ckpt_every < eval_every) resumes with that record, as an uninterrupted run has it."""
    from ppo_tiny import make, ppo_cfg

    class Crash(Exception):
        pass

    def crash(iteration: int) -> None:
        if iteration == 2:
            raise Crash

    torch.set_num_threads(1)
    cfg = ppo_cfg(max_steps=4, eval_every=3)
    whole = make(str(tmp_path / "whole"), cfg).fit()
    with pytest.raises(Crash):
        make(str(tmp_path / "cut"), cfg, on_iteration=crash).fit()
    again = make(str(tmp_path / "cut"), cfg).fit()
    assert again["start_iteration"] == 2
    assert [r["iteration"] for r in again["heldout"]] == [r["iteration"] for r in whole["heldout"]] == [0, 3, 4]
    assert again["heldout"] == whole["heldout"]
