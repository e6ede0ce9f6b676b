"""Issue 21, rejection sampling on the rule-checked world: the report carries the world's before/after figures and
`accuracy_control`, the init trained for as many steps on plain SFT dialogs under `<output>/control`, which a rerun
resumes instead of retraining."""
from __future__ import annotations

import json
import os

import pytest
from test_sft_support import SEQ, make_data, model_overrides, sft_overrides

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.train import checkpoint
from kubellama.components.core.world.evaluate import METRICS
from kubellama.components.rejection_sampling import stage as rs_stage
from kubellama.pipelines.cli import main as cli

WORLD = {"data.world.enabled": "true", "data.world.sft": 20, "data.world.dialogs": 4, "data.world.eval_dialogs": 2,
         "data.world.max_turns": 4, "data.world.pretrain": 10, "data.world.pairs": 20, "data.world.safety_pairs": 10,
         "data.world.rs": 8, "data.world.ppo": 4, "data.world.calib": 4, "data.world.eval": 4,
         "data.world.safety_sft": 10}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("rs_world")), dialogs=40, **WORLD)


def _ended(monkeypatch) -> None:
    """A random model rarely ends an answer within max_new_tokens, and a cut answer is never chosen: end every other
    sample."""
    real = rs_stage.sample_answers

    def half_ended(gen, seqs, cfg, eos_id, seeds, **kw):
        return [a if i % 2 else [*a[:3], eos_id] for i, a in enumerate(real(gen, seqs, cfg, eos_id, seeds, **kw))]

    monkeypatch.setattr(rs_stage, "sample_answers", half_ended)


def _rs(tmp_path, data: str) -> list[str]:
    rm_keys = ["reward.lr=3e-3", "reward.pairs_per_batch=8", "reward.micro_batch=8", "reward.max_steps=2",
               "reward.mixed_precision=fp32", "reward.eval_batch=32"]
    assert cli(["reward", *model_overrides(), *rm_keys, f"run.root={tmp_path}", "run.id=rm",
                f"reward.data={data}"]) == 0
    rm = os.path.join(str(tmp_path), "rm", "reward_helpfulness")
    return [*sft_overrides("rejection_sampling", max_steps=3, eval_fraction=0.3, global_batch_tokens=2 * SEQ),
            f"run.root={tmp_path}",
            f"rejection_sampling.data={data}", f"rejection_sampling.pool={tmp_path / 'pool'}",
            "rejection_sampling.samples=2", "rejection_sampling.sampling.max_new_tokens=6",
            "rejection_sampling.prompts=16", "rejection_sampling.score_batch=8",
            f"rejection_sampling.reward_models.helpfulness={rm}", f"rejection_sampling.reward_models.safety={rm}"]


def test_rs_reports_world_figures_and_a_plain_sft_control_that_a_rerun_resumes(tmp_path, data, monkeypatch):
    _ended(monkeypatch)
    common = _rs(tmp_path, data)
    assert cli(["rejection-sampling", *common, "run.id=w"]) == 0
    out = os.path.join(str(tmp_path), "w", "rejection_sampling")
    rep = json.load(open(os.path.join(out, "report.json")))
    world = rep["world"]
    for m in (*METRICS, "accuracy_control"):
        assert set(world[m]) >= {"before", "after", "n"}, m
        assert set(world[m]["before"]) == set(world[m]["after"]) == {"value", "ci"}, m
    control = world["accuracy_control"]
    # "before" is the stage's init, the same as its own accuracy's; "after" the control's output.
    assert control["before"] == world["accuracy"]["before"] and control["n"] == world["accuracy"]["n"] > 0
    assert control["rs_after"] == world["accuracy"]["after"]["value"]
    assert control["rs_beats_control"] == (control["rs_after"] >= control["after"]["value"])
    assert ("≥" if control["rs_beats_control"] else "<") in control["note"]
    # As many steps as the main fit, on data prep's SFT shards, its checkpoints and export under control/ only.
    assert rep["step"] == rep["max_steps"] == control["steps"] == 3
    assert rep["control"]["step"] == rep["control"]["max_steps"] == 3 and rep["control"]["status"] == "completed"
    ctl = os.path.join(out, "control")
    assert rep["control"]["output"] == ctl and rep["control"]["hf"] == os.path.join(ctl, "hf")
    assert rep["hf"] == os.path.join(out, "hf") and os.path.exists(os.path.join(out, "hf", "config.json"))
    assert os.path.exists(os.path.join(ctl, "world_after.json"))
    # Its own fingerprint (data prep's SFT shards, `rs.control`), so neither run could resume the other's checkpoints.
    mine, theirs = (checkpoint.meta(c)["fingerprint"] for c in (rep["checkpoint"], rep["control"]["checkpoint"]))
    assert theirs["rs.control"] is True and "rs.control" not in mine and "rs.round" in mine
    assert theirs["data.manifest"] != mine["data.manifest"] and theirs["rejection_sampling.max_steps"] == 3
    assert "plain-SFT control" in open(os.path.join(out, "report.md")).read()
    steps = [json.loads(x)["step"] for x in open(os.path.join(ctl, "metrics.jsonl"))]
    assert steps[-1] == 3
    kept = os.path.getmtime(os.path.join(ctl, "world_after.json"))
    # A rerun of the same run resumes both fits at their last step: nothing is trained again.
    assert cli(["rejection-sampling", *common, "run.id=w"]) == 0
    again = json.load(open(os.path.join(out, "report.json")))
    assert again["control"]["start_step"] == again["control"]["step"] == 3
    assert again["start_step"] == again["step"] == 3
    assert again["world"]["accuracy_control"] == control
    assert os.path.getmtime(os.path.join(ctl, "world_after.json")) == kept
    assert [json.loads(x)["step"] for x in open(os.path.join(ctl, "metrics.jsonl"))] == steps
    # Without the control: no control/ and no accuracy_control, the other figures unchanged in shape.
    assert cli(["rejection-sampling", *common, "run.id=n", "rejection_sampling.control=false"]) == 0
    off = json.load(open(os.path.join(str(tmp_path), "n", "rejection_sampling", "report.json")))
    assert "accuracy_control" not in off["world"] and "accuracy" in off["world"] and "control" not in off
    assert not os.path.exists(os.path.join(str(tmp_path), "n", "rejection_sampling", "control"))


def test_a_control_that_cannot_train_fails_before_sampling(tmp_path, data):
    cfg_keys = [*model_overrides(), f"rejection_sampling.data={data}", "rejection_sampling.seq_len=64",
                f"run.root={tmp_path}", "run.id=x"]
    with pytest.raises(ConfigError, match=r"rows hold 128 tokens, but rejection_sampling.seq_len=64"):
        rs_stage.train(runs.bind(load_config(cfg_keys), "rejection_sampling"))
    assert not os.path.exists(os.path.join(str(tmp_path), "x", "rejection_sampling", "round.jsonl"))
