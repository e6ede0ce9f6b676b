"""Issue 21, the reward models on the rule-checked world: with data prep's world on, each RM reports
world.pair_accuracy (and the safety RM world.unsafe_recall_at_0_5) on the held-out world pairs of its kinds, its
untrained model ("before") against the trained one ("after"), "before" kept across restarts."""
from __future__ import annotations

import json
import math
import os

import pytest
from test_reward_support import RM
from test_world import world_data

from kubellama.components.core.io import storage
from kubellama.components.core.world import sets, stats
from kubellama.components.reward import evaluate
from kubellama.pipelines.cli import main as cli

WORLD = {"data.world.enabled": "true", "data.world.sft": 10, "data.world.pairs": 20, "data.world.eval": 8,
         "data.world.calib": 4, "data.world.rs": 4, "data.world.ppo": 4, "data.world.pretrain": 10,
         "data.world.dialogs": 4, "data.world.eval_dialogs": 2, "data.world.max_turns": 4,
         "data.world.safety_sft": 10, "data.world.safety_pairs": 20}
STEPS = ["reward.max_steps=3"]


def _scores(kind: str, chosen: float, rejected: float, rejected_safe: bool = True) -> dict:
    return {"kind": kind, "chosen": chosen, "rejected": rejected, "rejected_safe": rejected_safe}


def test_world_figures_from_hand_made_scores():
    before = [_scores("correctness", 1.0, 2.0), _scores("correctness", 0.0, 0.0), _scores("correctness", 3.0, 1.0),
              _scores("correctness", -1.0, -2.0)]
    after = [_scores("correctness", 2.0, 1.0)] * 4
    got = evaluate.world(before, after, "helpfulness")
    assert set(got) == {"pair_accuracy"}  # the helpfulness RM reports no unsafe recall
    m = got["pair_accuracy"]
    # 2 of 4 before (a tie counts as wrong), 4 of 4 after; Wilson intervals.
    assert m["before"]["value"] == 0.5 and m["after"]["value"] == 1.0 and m["n"] == 4
    assert m["before"]["ci"] == [round(x, 4) for x in stats.wilson(2, 4)]
    assert m["after"]["ci"] == [round(x, 4) for x in stats.wilson(4, 4)] and m["kinds"] == ["correctness"]
    # Safety: unsafe answers are the rejected sides of harmful pairs; σ(score) < 0.5 means score < 0.
    before = [_scores("harmful", 0.5, 0.2, False), _scores("harmful", 1.0, -0.1, False),
              _scores("borderline", 0.0, -5.0), _scores("borderline", -1.0, 1.0)]
    after = [_scores("harmful", 2.0, -3.0, False), _scores("harmful", 1.0, -1.0, False),
             _scores("borderline", 1.0, -5.0), _scores("borderline", 1.0, 0.5)]
    got = evaluate.world(before, after, "safety")
    assert got["pair_accuracy"]["before"]["value"] == 0.75 and got["pair_accuracy"]["after"]["value"] == 1.0
    assert got["pair_accuracy"]["kinds"] == ["harmful", "borderline"] and got["pair_accuracy"]["n"] == 4
    recall = got["unsafe_recall_at_0_5"]
    assert recall["before"]["value"] == 0.5 and recall["after"]["value"] == 1.0 and recall["n"] == 2
    assert recall["kinds"] == ["harmful"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return world_data(str(tmp_path_factory.mktemp("rm_world")), WORLD, 512, seed=5, docs=30)


def _run(root, data: str, kind: str, *more: str) -> dict:
    assert cli(["reward", *RM, *STEPS, f"run.root={root}", "run.id=w", f"reward.data={data}", f"reward.kind={kind}",
                *more]) == 0
    return storage.read_json(os.path.join(str(root), "w", f"reward_{kind}", "report.json"))


def _held_out(data: str, kinds: tuple[str, ...]) -> list[dict]:
    url = sets.eval_url(data, "pairs")
    assert url is not None
    return [p for p in sets.read(url) if p["kind"] in kinds]


def _shape(metric: dict, n: int, kinds: list[str]) -> None:
    for side in ("before", "after"):
        f = metric[side]
        assert set(f) == {"value", "ci"} and 0.0 <= f["value"] <= 1.0, metric
        lo, hi = f["ci"]
        assert 0.0 <= lo <= f["value"] <= hi <= 1.0
    assert metric["n"] == n and metric["kinds"] == kinds


@pytest.mark.parametrize("kind", ["helpfulness", "safety"])
def test_reward_stage_reports_world_figures(tmp_path, data, kind):
    report = _run(tmp_path, data, kind)
    assert report["status"] == "completed"
    kinds = evaluate.WORLD_KINDS[kind]
    pairs = _held_out(data, kinds)
    assert pairs, "the small world holds pairs of these kinds"
    world = report["world"]
    _shape(world["pair_accuracy"], len(pairs), list(kinds))
    if kind == "safety":
        unsafe = [p for p in pairs if p["kind"] == "harmful" and not p["rejected_safe"]]
        assert unsafe
        _shape(world["unsafe_recall_at_0_5"], len(unsafe), ["harmful"])
    else:
        assert set(world) == {"pair_accuracy"}
    # "before" is the untrained model's, kept with the run; the report shows the world section.
    out = os.path.join(str(tmp_path), "w", f"reward_{kind}")
    kept = storage.read_json(os.path.join(out, "world_before.json"))
    assert len(kept) == len(pairs)
    acc = sum(s["chosen"] > s["rejected"] for s in kept) / len(kept)
    assert math.isclose(world["pair_accuracy"]["before"]["value"], acc)
    assert "rule-checked world" in open(os.path.join(out, "report.md"), encoding="utf-8").read()


def test_a_resumed_run_keeps_before(tmp_path, data):
    """A rerun resumes from the last checkpoint and reads "before" from world_before.json instead of scoring the
    model it holds then: the kept scores are changed by hand here, and the report follows them."""
    first = _run(tmp_path, data, "helpfulness")
    url = os.path.join(str(tmp_path), "w", "reward_helpfulness", "world_before.json")
    kept = storage.read_json(url)
    hand = [{**s, "chosen": 1.0, "rejected": 0.0} for s in kept]
    storage.write_text(url, json.dumps(hand))
    again = _run(tmp_path, data, "helpfulness")
    assert again["step"] == first["step"]
    assert again["world"]["pair_accuracy"]["before"]["value"] == 1.0
    assert again["world"]["pair_accuracy"]["after"] == first["world"]["pair_accuracy"]["after"]

