"""Issue 21 defects of rejection sampling: a truncated answer (no EOS within max_new_tokens) never becomes a clean SFT
target, the pool is rescored with the current round's reward models before each prompt's best is chosen, and the
prompts come from data prep's rs split, not the RMs' training pairs."""
from __future__ import annotations

import json

import torch

from kubellama.components.core.rlhf.rollout import prompts_of
from kubellama.components.core.train import dist
from kubellama.components.rejection_sampling.stage import (
    best_of,
    pool_best,
    prompt_source,
    read_pool,
    rescore,
    round_records,
)

EOS = 2


class CharTok:
    """A tokenizer stand-in: one id per character (ids above the EOS), the chat markup left out."""

    eos_id, vocab_size = EOS, 1000

    def encode_dialog_prompt(self, messages):
        return [ord(c) for c in messages[-1]["content"]]

    def encode_dialog(self, messages):
        ids = [*self.encode_dialog_prompt(messages[:-1]), *(ord(c) for c in messages[-1]["content"]), EOS]
        return ids, ids

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def text(s: str) -> list[int]:
    return [ord(c) for c in s]


class P:
    def __init__(self, q: str, safety: bool = False):
        self.ids, self.safety, self.messages = text(q), safety, [{"role": "user", "content": q}]


def test_truncated_answers_are_never_chosen_and_their_share_is_reported():
    prompts = [P("q1"), P("q2")]
    found = [
        # The best reward is an answer cut at max_new_tokens (no EOS): the best complete one is kept instead.
        {"answers": [text("cut off mid"), [*text("done"), EOS], [*text("ok"), EOS]], "rewards": [5.0, 1.0, 2.0]},
        # Every answer cut: the prompt adds nothing to the pool this round.
        {"answers": [text("aaaa"), text("bbbb"), text("cccc")], "rewards": [3.0, 2.0, 1.0]},
    ]
    best, lines, stats = round_records(prompts, found, CharTok(), "r1")
    assert [b["messages"][-1]["content"] for b in best] == ["ok"] and best[0]["reward"] == 2.0
    assert lines[0]["best"] == 2 and lines[1]["best"] is None
    assert lines[0]["truncated"] == [True, False, False] and lines[1]["truncated"] == [True, True, True]
    assert stats == {"truncated_share": 4 / 6, "prompts_all_truncated": 1}
    assert best_of(torch.tensor([[5.0, 1.0, 2.0]]), torch.tensor([[False, True, True]])).tolist() == [2]
    assert best_of(torch.tensor([[5.0, 1.0]]), torch.tensor([[False, False]])).tolist() == [-1]


def test_pool_is_rescored_with_the_current_reward_models(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()

    def rec(answer: str, reward: float, rnd: str) -> str:
        return json.dumps({"key": "ab12", "reward": reward, "round": rnd, "safety": False,
                           "messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": answer}]}) + "\n"

    # Round 1's RMs gave its answer a high reward; this round's RMs prefer round 2's answer.
    (pool / "r1.jsonl").write_text(rec("stale", 9.0, "r1"))
    (pool / "r2.jsonl").write_text(rec("better", 1.0, "r2"))
    seen = []

    def current(prompts, responses, safety):
        seen.extend(responses)
        return torch.tensor([1.0 if r[:-1] == text("better") else -1.0 for r in responses])

    records = read_pool(str(pool))
    rewards = rescore(records, CharTok(), current, dist.init(), batch=1)
    assert rewards == [-1.0, 1.0]
    # What is scored is what SFT trains on: the answer closed by its EOS.
    assert sorted(map(tuple, seen)) == sorted([(*text("stale"), EOS), (*text("better"), EOS)])
    best = pool_best(records, rewards)
    assert best["ab12"]["round"] == "r2" and best["ab12"]["messages"][-1]["content"] == "better"
    # Without rescoring the stale reward would win.
    assert pool_best(records, [r["reward"] for r in records])["ab12"]["round"] == "r1"


def test_prompts_come_from_the_rs_split_not_the_rms_training_pairs(tmp_path):
    data = tmp_path / "data"
    (data / "preference").mkdir(parents=True)
    (data / "prompts").mkdir()
    pair = {"messages": [{"role": "user", "content": "rm prompt"}], "chosen": "a", "rejected": "b",
            "rating": "better", "safety": False, "chosen_safe": True, "rejected_safe": True}
    (data / "preference" / "train.jsonl").write_text(json.dumps(pair) + "\n")
    (data / "prompts" / "rs.jsonl").write_text("".join(
        json.dumps({"id": f"s-{i}", "prompt": f"rs prompt {i}", "safety": i == 1, "source": "s"}) + "\n"
        for i in range(3)))
    (data / "prompts" / "ppo.jsonl").write_text(
        json.dumps({"id": "p-0", "prompt": "ppo prompt", "safety": False, "source": "s"}) + "\n")
    url = prompt_source(str(data))
    assert url == str(data / "prompts" / "rs.jsonl")
    prompts, _, _ = prompts_of(url, CharTok(), 1000)
    assert [p.messages[-1]["content"] for p in prompts] == [f"rs prompt {i}" for i in range(3)]
    assert [p.safety for p in prompts] == [False, True, False]
    # A data prep output without prompt sets (data.prompts.sources empty) still has the preference prompts.
    (data / "prompts" / "rs.jsonl").unlink()
    assert prompt_source(str(data)) == str(data / "preference" / "train.jsonl")
