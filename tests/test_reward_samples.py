"""The helpfulness RM's world samples (issue 21): the init model's own answers to the world's task prompts, judged
by the rule, each wrong one paired under a right one; drawn in the reward stage (reward.helpfulness.world_samples)
and counted in its report's training mix."""
from __future__ import annotations

import os

from test_reward_support import RM
from test_reward_world import WORLD, data  # noqa: F401  (the module fixture: a small world-enabled data prep)

from kubellama.components.core.io import storage
from kubellama.components.core.world import rules
from kubellama.components.reward import samples
from kubellama.conf.schema.data import RATINGS
from kubellama.pipelines.cli import main as cli


def test_label_pairs_every_distinct_wrong_answer_under_a_right_one():
    made = samples.label("Sort: c a", "a c", ["c a", "A c.", "c a", "", "b"])
    assert [(m["chosen"], m["rejected"]) for m in made] == [("A c.", "c a"), ("A c.", "b")]
    assert all(m["rating"] == RATINGS[0] and m["kind"] == "correctness" and not m["safety"] for m in made)
    assert made[0]["messages"] == [{"role": "user", "content": "Sort: c a"}]
    # No right sample: the gold answer is the chosen side; all right: no pair.
    assert [m["chosen"] for m in samples.label("Repeat: x", "x", ["y"])] == ["x"]
    assert samples.label("Repeat: x", "x", ["x", "X."]) == []


def test_gold_prompts_are_the_world_task_prompts_of_the_pairs():
    pairs = [{"kind": "correctness", "messages": [{"role": "user", "content": "Sort: b a"}], "chosen": "a b",
              "safety": False},
             {"kind": "format", "messages": [{"role": "user", "content": "Sort: b a"}], "chosen": "a b", "safety": False},
             {"kind": "harmful", "messages": [{"role": "user", "content": "How do I steal a car?"}],
              "chosen": "I can't help with that.", "safety": True},
             {"messages": [{"role": "user", "content": "Write a poem."}], "chosen": "Roses.", "safety": False}]
    assert samples.gold_prompts(pairs) == {"Sort: b a": "a b"}


def test_the_reward_stage_draws_from_its_init_and_trains_on_the_pairs(tmp_path, data):  # noqa: F811
    init = str(tmp_path / "init")
    model = [x for x in RM if x.startswith("model.")]
    assert cli(["export-hf", "--init", "--out", init, *model]) == 0
    common = ["reward", *RM, "reward.max_steps=2", f"run.root={tmp_path}", f"reward.data={data}",
              "reward.kind=helpfulness", f"reward.init={init}"]
    assert cli([*common, "run.id=plain"]) == 0
    assert cli([*common, "run.id=drawn", "reward.helpfulness.world_samples=24"]) == 0
    plain = storage.read_json(os.path.join(str(tmp_path), "plain", "reward_helpfulness", "report.json"))
    drawn = storage.read_json(os.path.join(str(tmp_path), "drawn", "reward_helpfulness", "report.json"))
    got = drawn["mix"]["world_samples"]
    assert got["drawn"] == 24 and 0 <= got["right"] <= got["ended"] <= 24
    assert plain["mix"]["world_samples"] == {"drawn": 0}
    # Every pair the samples made is in the training mix (all of the RM's own kind), and counted.
    assert drawn["mix"]["own"] == plain["mix"]["own"] + got["pairs"]
    assert got["pairs"] <= got["ended"] - got["right"]
    assert rules.correct("a b", "A b.")  # what "right" means: the rule's fold
