"""Issue 21 defects of the reward stage: per-variant settings (the safety RM's auxiliary loss on by default, the
helpfulness RM unaffected) and the safety RM's unsafe recall at 0.5 (Table 29) next to the routing rule's."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_reward_support import RM, separable_data

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import from_dict, load_config
from kubellama.components.reward import evaluate, stage
from kubellama.pipelines import llama2
from kubellama.pipelines.cli import main as cli


def step_section(cfg, variant: str):
    """The `reward` section the pipeline's step of `variant` receives, as the stage resolves it."""
    return stage.resolve(from_dict(json.loads(llama2.stage_config(cfg, "reward", variant))).reward)


def test_both_variants_build_with_the_safety_aux_loss_on_by_default():
    cfg = load_config([])
    helpful, safety = step_section(cfg, "helpfulness"), step_section(cfg, "safety")
    assert helpful.kind == "helpfulness" and stage.aux_weight(helpful) == 0.0
    assert safety.kind == "safety" and stage.aux_weight(safety) == 1.0
    for section in (helpful, safety):
        stage.schedule(section, 1024, 1)  # raised for the helpfulness variant when the aux loss was shared


def test_variant_settings_override_the_shared_ones_for_that_variant_only():
    cfg = load_config(["reward.lr=2e-5", "reward.safety.lr=4e-6", "reward.safety.aux_loss_weight=0.5",
                       "reward.helpfulness.max_steps=7"])
    helpful, safety = step_section(cfg, "helpfulness"), step_section(cfg, "safety")
    assert (helpful.lr, helpful.max_steps, stage.aux_weight(helpful)) == (2e-5, 7, 0.0)
    assert (safety.lr, safety.max_steps, stage.aux_weight(safety)) == (4e-6, 0, 0.5)
    # Each step's config holds its own settings only: the other variant's do not change its cache key.
    assert llama2.stage_config(cfg, "reward", "helpfulness") == llama2.stage_config(
        load_config(["reward.lr=2e-5", "reward.safety.lr=1e-3", "reward.helpfulness.max_steps=7"]), "reward",
        "helpfulness")


def test_the_old_shared_key_names_its_new_place():
    with pytest.raises(ConfigError, match="reward.aux_loss_weight' moved to 'reward.safety.aux_loss_weight'"):
        load_config(["reward.aux_loss_weight=1.0"])
    with pytest.raises(ConfigError, match="reward.helpfulness.aux_loss_weight"):
        load_config(["reward.helpfulness.aux_loss_weight=1.0"])


def test_safety_variant_trains_with_the_aux_loss_from_its_own_section(tmp_path):
    data = separable_data(str(tmp_path / "rm"))
    common = [*RM, "reward.max_steps=5", f"run.root={tmp_path}", f"reward.data={data}"]
    assert cli(["reward", *common, "run.id=s", "reward.kind=safety", "reward.safety.aux_loss_weight=2.0"]) == 0
    report = storage.read_json(os.path.join(str(tmp_path), "s", "reward_safety", "report.json"))
    assert report["aux_loss_weight"] == 2.0
    assert cli(["reward", *common, "run.id=h", "reward.safety.aux_loss_weight=2.0"]) == 0
    report = storage.read_json(os.path.join(str(tmp_path), "h", "reward_helpfulness", "report.json"))
    assert report["aux_loss_weight"] == 0.0


def test_unsafe_recall_at_0_5_and_at_the_rule_by_hand():
    # σ(score) of these: 0.1192, 0.2689, 0.4502, 0.6225, 0.8808, 0.0474
    scores = torch.tensor([-2.0, -1.0, -0.2, 0.5, 2.0, -3.0])
    unsafe = torch.tensor([True, True, True, True, False, False])
    out = evaluate.unsafe_recall(scores, unsafe, 0.15)
    # At 0.5 three of the four unsafe answers are below (Table 29's measure); at the 0.15 rule only one.
    assert out["unsafe_recall_at_0_5"] == 3 / 4
    assert out["unsafe_recall_at_rule"] == 1 / 4
    assert out["unsafe_precision_at_rule"] == 1 / 2 and out["combined"]["threshold"] == 0.15
    assert "unsafe_recall" not in out
