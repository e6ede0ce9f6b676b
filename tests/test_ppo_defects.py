"""Issue 21's PPO defects, one test each: collectives on the group's device, the best held-out policy exported at an
early stop, truncated answers, log-probs at the sampling temperature, PPO's own prompt sets, global token
normalisation, the critic's learning rate, an fp32 head, the raw combined score, and the collapse guards."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as tdist
from ppo_tiny import ppo_cfg, prompts
from test_trainer_support import model_cfg, spawn

from kubellama.components.core.rlhf.combined import Whitener
from kubellama.components.core.rlhf.reward_models import combined_reward
from kubellama.components.core.rlhf.rollout import prompts_of
from kubellama.components.ppo import stage
from kubellama.components.ppo import update as ppo_update
from kubellama.components.ppo.loop import Ppo
from kubellama.components.ppo.update import update
from kubellama.conf.schema.ppo import PpoConfig
from kubellama.conf.schema.reward import CombinedRewardConfig


def zero(prompt_ids, responses, safety):
    return torch.zeros(len(responses), dtype=torch.float64)


# --- 1: collectives on the process group's device -------------------------------------------------------------


def _refusing_cpu(fn):
    """What `init_process_group("cuda:gloo")` does: the default group has no CPU backend."""
    def wrapped(tensor, *args, group=None, **kw):
        if (group is None or group is tdist.group.WORLD) and tensor.device.type == "cpu":
            raise RuntimeError("No backend type associated with device type cpu")
        return fn(tensor, *args, group=group, **kw)
    return wrapped


def _whiten_cpu(env, x: torch.Tensor, out: str) -> None:
    tdist.all_reduce = _refusing_cpu(tdist.all_reduce)
    tdist.all_gather = _refusing_cpu(tdist.all_gather)
    half = x.shape[0] // 2
    mine = x[env.rank * half:(env.rank + 1) * half]  # Scorer.score_ids' CPU scores
    torch.save((Whitener("batch", eps=0.0)(mine), Whitener("running", eps=0.0)(mine)), f"{out}.{env.rank}")


def test_whitener_hands_the_default_group_no_cpu_tensor(tmp_path):
    x = torch.tensor([1.0, 4.0, -2.0, 7.0], dtype=torch.float64)
    spawn(_whiten_cpu, 2, x, str(tmp_path / "w"))
    expect = (x - x.mean()) / x.std(unbiased=False)
    for k in range(2):
        got = torch.cat([torch.load(tmp_path / f"w.{r}")[k] for r in range(2)])
        assert torch.allclose(got, expect)


# --- 4: early stop exports the best held-out iteration --------------------------------------------------------


SCORES = {0: 0.0, 1: 5.0, 2: 1.0, 3: 0.5, 4: 0.4}


class _Scripted(Ppo):
    """Held-out rewards by iteration (SCORES): the best at 1, then worse."""

    def heldout_eval(self):
        return {"heldout_reward": SCORES[self.iteration], "empty_rate": 0.0}


def test_early_stop_exports_the_best_heldout_iteration_not_the_last(tmp_path):
    torch.set_num_threads(1)
    weights = {}

    def keep(it: int) -> None:
        weights[it] = ppo.full_state_dict()

    cfg = ppo_cfg(max_steps=4, eval_every=1, ckpt_every=1, keep_last=1, patience=1)
    ppo = _Scripted(cfg, model_cfg(), str(tmp_path), prompts(48, 0), prompts(4, 1), zero, eos_id=-1, seed=5,
                    on_iteration=keep)
    s = ppo.fit()
    assert s["stop_reason"] == "heldout_plateau" and s["iterations"] == 2
    assert s["exported_iteration"] == 1
    final = ppo.full_state_dict()
    assert all(torch.equal(final[k], weights[1][k]) for k in final)
    assert not all(torch.equal(final[k], weights[2][k]) for k in final)
    assert ppo.lineage()["step"] == 1


# --- 5: truncated answers --------------------------------------------------------------------------------------


class _Rm:
    def __init__(self, scores: list[float], max_len: int = 64):
        self.scores, self.max_len, self.seen = scores, max_len, []

    def score_ids(self, seqs):
        self.seen = [list(s) for s in seqs]
        return torch.tensor(self.scores[:len(seqs)])


def test_a_truncated_answer_gets_no_eos_appended():
    helpful, safe = _Rm([1.0, 1.0]), _Rm([1.0, 1.0])
    combined_reward(helpful, safe, cfg=CombinedRewardConfig())([[1, 5], [1, 6]], [[9, 9], [9, 2]],
                                                                          [False, False])
    assert helpful.seen == [[1, 5, 9, 9], [1, 6, 9, 2]]


def test_truncated_answers_are_penalised_and_counted(tmp_path):
    torch.set_num_threads(1)
    # eos_id -1 is never sampled: every answer runs to max_new_tokens.
    ppo = Ppo(ppo_cfg(missing_eos_penalty=1.5), model_cfg(), str(tmp_path), prompts(48, 0), [], zero, eos_id=-1,
              seed=5)
    roll = ppo.rollout(0)
    assert roll.truncated == 1.0
    assert roll.reward == pytest.approx(-1.5)


# --- 7: log-probs at the sampling temperature ------------------------------------------------------------------


def test_old_logprobs_are_those_of_the_sampling_distribution(tmp_path):
    torch.set_num_threads(1)
    cfg = ppo_cfg(temperature=0.5)
    ppo = Ppo(cfg, model_cfg(), str(tmp_path), prompts(48, 0), [], zero, eos_id=-1, seed=5)
    roll = ppo.rollout(0)
    with torch.no_grad():
        logits = ppo.policy(roll.tokens)
    sampled = torch.log_softmax(logits[:, :-1].float() / 0.5, -1).gather(-1, roll.tokens[:, 1:, None]).squeeze(-1)
    m = roll.mask.bool()
    assert torch.allclose(roll.logp[m], sampled[m], atol=1e-5)
    # The update recomputes the same log-probs for the unchanged policy: ratio 1, nothing clipped.
    stats = update(ppo.policy, ppo.value, ppo.opt_policy, ppo.opt_value, roll, 0, 0.0, 5, cfg, ppo.env)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-7) and stats["clip_fraction"] == 0.0


# --- 8: PPO's own prompt sets ----------------------------------------------------------------------------------


class _Tok:
    def encode_dialog_prompt(self, messages):
        return [1] + [3 + ord(c) % 100 for c in messages[-1]["content"]]


def _jsonl(path, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _pair(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "chosen": "a", "rejected": "b",
            "rating": "better", "chosen_safe": True, "rejected_safe": True, "safety": False}


def test_ppo_trains_on_the_ppo_prompt_set_not_the_rm_training_prompts(tmp_path):
    data = str(tmp_path)
    _jsonl(f"{data}/preference/train.jsonl", [_pair(f"rm prompt {i}") for i in range(5)])
    _jsonl(f"{data}/preference/eval.jsonl", [_pair(f"rm eval {i}") for i in range(3)])
    _jsonl(f"{data}/prompts/ppo.jsonl", [{"id": f"p-{i}", "prompt": f"ppo prompt {i}", "safety": i == 1,
                                          "source": "p"} for i in range(4)])
    _jsonl(f"{data}/prompts/eval.jsonl", [{"id": f"e-{i}", "prompt": f"held {i}", "safety": False, "source": "p"}
                                          for i in range(2)])
    _jsonl(f"{data}/prompts/rs.jsonl", [{"id": "r-0", "prompt": "rs prompt", "safety": False, "source": "p"}])
    sets = stage.prompt_sets(data, _Tok(), 1000, 0, 0)
    train = [p.messages[-1]["content"] for p in sets.train]
    assert train == [f"ppo prompt {i}" for i in range(4)]
    assert [p.safety for p in sets.train] == [False, True, False, False]
    assert [p.messages[-1]["content"] for p in sets.heldout] == ["held 0", "held 1"]
    rm_prompts, _, _ = prompts_of(f"{data}/preference/train.jsonl", _Tok(), 1000)
    assert not set(train) & {p.messages[-1]["content"] for p in rm_prompts}
    assert sets.train_file.endswith("prompts/ppo.jsonl") and sets.heldout_file.endswith("prompts/eval.jsonl")


# --- 12: smaller ------------------------------------------------------------------------------------------------


def _tokens(env, counts: list[int], out: str) -> None:
    mask = torch.zeros(1, 8)
    mask[0, :counts[env.rank]] = 1.0
    torch.save(ppo_update.minibatch_tokens(mask, env), f"{out}.{env.rank}")


def test_minibatches_are_normalised_by_the_global_token_count(tmp_path):
    # Rank 0 holds 3 response tokens, rank 1 holds 5: each divides by the mean, 4, so FSDP's average of the
    # ranks' gradients is the gradient of (sum over all 8 tokens) / 8.
    spawn(_tokens, 2, [3, 5], str(tmp_path / "n"))
    assert [torch.load(tmp_path / f"n.{r}") for r in range(2)] == [4.0, 4.0]


def test_the_critic_has_its_own_learning_rate_and_value_coef_is_gone(tmp_path):
    from kubellama.components.core.errors import ConfigError
    from kubellama.components.core.recipe.config import load_config

    torch.set_num_threads(1)
    assert "value_coef" not in PpoConfig.__dataclass_fields__
    with pytest.raises(ConfigError, match="ppo.critic_lr"):
        load_config(["ppo.value_coef=0.5"])
    cfg = ppo_cfg(lr=3e-3, critic_lr=7e-4)
    ppo = Ppo(cfg, model_cfg(), str(tmp_path), prompts(48, 0), [], zero, eos_id=-1, seed=5)
    ppo._step()
    assert ppo.opt_policy.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert ppo.opt_value.param_groups[0]["lr"] == pytest.approx(7e-4)


def test_log_probs_come_from_an_fp32_head_under_bf16_compute(tmp_path):
    torch.set_num_threads(1)
    ppo = Ppo(ppo_cfg(mixed_precision="bf16"), model_cfg(), str(tmp_path), prompts(48, 0), [], zero, eos_id=-1,
              seed=5)
    tokens = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert ppo.policy(tokens).dtype == torch.float32
        assert ppo.ref(tokens).dtype == torch.float32


def test_the_combined_reward_is_the_raw_score_picked_by_the_rule():
    # logit(sigmoid(12)) in float32 is 12.009: the raw score itself is what the rule picks.
    helpful, safe = _Rm([12.0, 12.0, 7.0]), _Rm([3.0, -3.0, 9.0])
    got = combined_reward(helpful, safe, cfg=CombinedRewardConfig())([[1]] * 3, [[5, 2]] * 3,
                                                                               [False, False, True])
    assert got.dtype == torch.float64
    assert got.tolist() == [12.0, -3.0, 9.0]


# --- guards (issue item 3) --------------------------------------------------------------------------------------


def test_length_guard_default_is_half_the_first_rollout():
    assert PpoConfig().min_length_ratio == 0.5


class _Mute(Ppo):
    """A policy whose greedy answers are EOS at once after its first update."""

    def _generated(self, prompts, seeds, **kw):
        out = super()._generated(prompts, seeds, **kw)
        if kw.get("temperature") == 0.0 and self.iteration > 0:
            return [[self.eos_id] for _ in prompts]
        return out


def test_a_policy_that_answers_eos_at_once_is_stopped_with_a_one_line_reason(tmp_path):
    torch.set_num_threads(1)
    ppo = _Mute(ppo_cfg(max_steps=4, eval_every=1, max_empty_rate=0.2), model_cfg(), str(tmp_path),
                prompts(48, 0), prompts(4, 1), zero, eos_id=3, seed=5)
    s = ppo.fit()
    assert s["status"] == "stopped" and s["stop_reason"] == "empty_answers" and s["iterations"] == 1
    assert "\n" not in s["stop_message"] and "empty" in s["stop_message"]
    assert s["heldout"][-1]["empty_rate"] == 1.0


class _Recorder(torch.optim.SGD):
    """Records each step's full policy gradient (all ranks call step together: full_tensor is collective)."""

    def __init__(self, params, out: list):
        super().__init__(params, lr=0.0)
        self.out = out

    def step(self, closure=None):
        self.out.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                         for g in self.param_groups for p in g["params"] if p.grad is not None])


def _uneven_update(env, out: str) -> None:
    from kubellama.components.ppo.experience import Rollout

    # Rows 0-1 answer with 1 token, rows 2-3 with 5: on two ranks, rank 0 holds 2 tokens and rank 1 holds 10.
    tokens = torch.tensor([[1, 5, 9, 0, 0, 0, 0], [1, 6, 9, 0, 0, 0, 0], [1, 7, 9, 8, 7, 6, 5],
                           [1, 8, 9, 10, 11, 12, 13]])
    mask = torch.zeros(4, 6)
    mask[:2, 1:2] = 1.0
    mask[2:, 1:6] = 1.0
    rows = slice(0, 4) if env.world_size == 1 else slice(2 * env.rank, 2 * env.rank + 2)
    t, m = tokens[rows], mask[rows]
    roll = Rollout(t, m, torch.zeros_like(m), torch.zeros_like(m), m.clone(), m.clone(), 0.0, 0.0, 0.0, 0.0)
    cfg = ppo_cfg(prompts_per_batch=4, minibatch=4, micro_batch=4)
    ppo = Ppo(cfg, model_cfg(), f"{out}/run{env.world_size}", prompts(8, 0), [], zero, eos_id=-1, seed=5, env=env)
    grads: list = []
    update(ppo.policy, ppo.value, _Recorder(ppo.policy.parameters(), grads), _Recorder(ppo.value.parameters(), []),
           roll, 0, 0.0, 5, cfg, env)
    if env.rank == 0:
        torch.save(grads[0], f"{out}/g{env.world_size}.pt")


def test_two_ranks_with_uneven_tokens_take_the_one_rank_gradient(tmp_path):
    spawn(_uneven_update, 1, str(tmp_path))
    spawn(_uneven_update, 2, str(tmp_path))
    one, two = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    assert len(one) == len(two)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(one, two))
