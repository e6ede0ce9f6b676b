"""Rejection sampling: the argmax sample is kept (deterministic reward), reward statistics by K by hand, the pool
keeps each prompt's best over rounds, and the stage end to end through the CLI in two rounds sharing a pool."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_reward_support import MODEL, RM, separable_data

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.train import dist
from kubellama.components.rejection_sampling import stage as rs_stage
from kubellama.components.rejection_sampling.stage import (
    best_of,
    pool_best,
    read_pool,
    reward_by_k,
    sample_round,
)
from kubellama.pipelines.cli import main as cli


def test_reward_by_k_by_hand():
    r = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 0.0, 8.0]])
    by_k = {x["k"]: x for x in reward_by_k(r)}
    assert sorted(by_k) == [1, 2, 4]
    assert by_k[1]["max"] == 2.5 and by_k[1]["gap"] == 0.0
    assert by_k[2]["max"] == (3 + 4) / 2 and by_k[2]["median"] == (2 + 2) / 2
    assert by_k[4]["max"] == (3 + 8) / 2 and by_k[4]["median"] == (1.5 + 2) / 2
    assert by_k[4]["gap"] == pytest.approx(by_k[4]["max"] - by_k[4]["median"])


def test_sampling_keeps_the_argmax_of_a_deterministic_reward():
    from ppo_tiny import GOOD, make, ppo_cfg, prompts, reward, sampling

    torch.set_num_threads(1)
    ppo = make("/tmp/unused-rs", ppo_cfg())
    gen = ppo.generator_model()
    ps = prompts(3, 2)
    found = sample_round(gen, ps, 6, sampling(temperature=1.5), -1, reward, dist.init(), (1, 2))
    for f in found:
        assert len(f["answers"]) == 6
        k = int(best_of(torch.tensor([f["rewards"]]))[0])
        scores = [sum(t == GOOD for t in a) / len(a) for a in f["answers"]]
        assert f["rewards"][k] == max(scores) and k == scores.index(max(scores))
    # Seeded: the same round again samples the same answers.
    again = sample_round(gen, ps, 6, sampling(temperature=1.5), -1, reward, dist.init(), (1, 2))
    assert again == found


def test_pool_keeps_each_prompts_best_over_rounds(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    dialog = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

    def rec(key: str, reward: float, round: str) -> str:
        return json.dumps({"key": key, "reward": reward, "round": round, "messages": dialog}) + "\n"

    (pool / "r1.jsonl").write_text(rec("a", 1.0, "r1") + rec("b", 5.0, "r1"))
    (pool / "r2.jsonl").write_text(rec("a", 2.0, "r2") + rec("b", 4.0, "r2"))
    records = read_pool(str(pool))
    # By the rewards given (the stage passes the current RMs' rescoring; here each record's own).
    best = pool_best(records, [r["reward"] for r in records])
    assert best["a"]["round"] == "r2" and best["b"]["round"] == "r1"
    # The pool outlives runs: a line that is not a record is one error naming the file and line.
    (pool / "r3.jsonl").write_text(rec("a", 3.0, "r3") + "{oops\n")
    with pytest.raises(KubellamaError, match=r"r3\.jsonl:2: not valid JSON"):
        read_pool(str(pool))
    (pool / "r3.jsonl").write_text(rec("../x", 3.0, "r3"))
    with pytest.raises(KubellamaError, match=r"r3\.jsonl: not a pool record \(key '\.\./x'\)"):
        read_pool(str(pool))


RS = [f"model.{k}={v}" for k, v in MODEL.items()] + [
    "rejection_sampling.samples=4", "rejection_sampling.sampling.max_new_tokens=8", "rejection_sampling.prompts=6",
    "rejection_sampling.global_batch_tokens=128", "rejection_sampling.micro_batch=2", "rejection_sampling.epochs=1",
    "rejection_sampling.lr=1e-3", "rejection_sampling.mixed_precision=fp32", "rejection_sampling.eval_fraction=0.3"]


def test_two_rounds_share_the_pool(tmp_path, monkeypatch):
    # A random model rarely ends an answer within 8 tokens, and a cut answer is never chosen: end every other sample.
    real = rs_stage.sample_answers

    def half_ended(gen, seqs, cfg, eos_id, seeds, **kw):
        return [a if i % 2 else [*a[:3], eos_id] for i, a in enumerate(real(gen, seqs, cfg, eos_id, seeds, **kw))]

    monkeypatch.setattr(rs_stage, "sample_answers", half_ended)
    data = separable_data(str(tmp_path / "d"))
    assert cli(["reward", *RM, "reward.max_steps=5", f"run.root={tmp_path}", "run.id=t", f"reward.data={data}"]) == 0
    rm = os.path.join(str(tmp_path), "t", "reward_helpfulness")
    pool = str(tmp_path / "pool")
    common = [*RS, f"run.root={tmp_path}", f"rejection_sampling.data={data}", f"rejection_sampling.pool={pool}",
              f"rejection_sampling.reward_models.helpfulness={rm}",
              f"rejection_sampling.reward_models.safety={rm}"]
    assert cli(["rejection-sampling", *common, "run.id=r1"]) == 0
    r1 = json.load(open(os.path.join(str(tmp_path), "r1", "rejection_sampling", "report.json")))
    assert [x["k"] for x in r1["reward_by_k"]] == [1, 2, 4] and r1["prompts"] == 6
    assert all(x["max"] >= x["median"] for x in r1["reward_by_k"])
    assert r1["status"] == "completed" and os.path.exists(os.path.join(str(tmp_path), "r1", "rejection_sampling",
                                                                       "hf", "config.json"))
    # Round 2 over other prompts: its SFT set draws from both rounds.
    assert cli(["rejection-sampling", *common, "run.id=r2", "rejection_sampling.prompts=9"]) == 0
    r2 = json.load(open(os.path.join(str(tmp_path), "r2", "rejection_sampling", "report.json")))
    assert sorted(os.listdir(pool)) == ["r1.jsonl", "r2.jsonl"]
    records = read_pool(pool)
    assert r2["pool_examples"] == len({r["key"] for r in records}) == 9
    # Both rounds' records were rescored by round 2's reward models before the best per prompt was chosen.
    assert r2["pool_rescored"] == len(records) and 0 < r2["truncated_share"] <= 0.5
