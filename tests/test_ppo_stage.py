"""Stage ppo end to end through the CLI on a tiny model: two reward models (the same separable RM twice) through
the combined reward, the report's fields, the HF export, and a rerun of a finished run that resumes and redoes
nothing."""
from __future__ import annotations

import json
import os

import pytest
import torch
from test_reward_support import MODEL, RM, separable_data

from kubellama.components.core.rlhf.combined import Whitener
from kubellama.components.core.rlhf.reward_models import combined_reward
from kubellama.conf.schema.reward import CombinedRewardConfig
from kubellama.pipelines.cli import main as cli

PPO = [f"model.{k}={v}" for k, v in MODEL.items()] + [
    "ppo.lr=1e-3", "ppo.prompts_per_batch=8", "ppo.minibatch=4", "ppo.micro_batch=4",
    "ppo.sampling.max_new_tokens=8", "ppo.max_steps=3", "ppo.heldout_prompts=4", "ppo.eval_every=1",
    "ppo.mixed_precision=fp32", "ppo.ckpt_every=2", "ppo.patience=0"]


@pytest.fixture(scope="module")
def rm(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ppo_rm")
    data = separable_data(str(root))
    assert cli(["reward", *RM, "reward.max_steps=10", f"run.root={root}", "run.id=t", f"reward.data={data}"]) == 0
    return data, os.path.join(str(root), "t", "reward_helpfulness")


def test_ppo_stage_reports_the_issue_fields_and_exports(tmp_path, rm):
    data, url = rm
    args = ["ppo", *PPO, f"run.root={tmp_path}", "run.id=p", f"ppo.data={data}",
            f"ppo.reward_models.helpfulness={url}", f"ppo.reward_models.safety={url}"]
    assert cli(args) == 0
    out = os.path.join(str(tmp_path), "p", "ppo")
    report = json.load(open(os.path.join(out, "report.json")))
    for key in ("reward_first", "reward_last", "kl_last", "iterations", "stopped_early", "stop_reason", "lineage"):
        assert key in report, key
    assert report["iterations"] == 3 and report["status"] == "completed"
    assert report["heldout_prompts"] == 4 and len(report["heldout"]) == 4  # start + every iteration
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    assert os.path.exists(os.path.join(out, "reward.png")) and os.path.exists(os.path.join(out, "kl.png"))
    # The same run again: it resumes at its last iteration and ends there.
    assert cli(args) == 0
    assert json.load(open(os.path.join(out, "report.json")))["start_iteration"] == 3


def test_bad_rollout_mode_is_one_line(tmp_path, rm, capsys):
    data, url = rm
    assert cli(["ppo", *PPO, f"run.root={tmp_path}", f"ppo.data={data}", f"ppo.reward_models.helpfulness={url}",
                f"ppo.reward_models.safety={url}", "ppo.rollout=sharded"]) == 2
    assert "ppo.rollout='sharded'" in capsys.readouterr().err


def test_empty_reward_model_urls_are_refused_by_name():
    from kubellama.components.core.errors import ConfigError
    from kubellama.components.core.recipe.config import load_config
    from kubellama.components.core.rlhf.reward_models import load_reward

    cfg = load_config([])
    for section in ("ppo", "rejection_sampling"):
        with pytest.raises(ConfigError, match=rf"{section}\.reward_models\.helpfulness is empty"):
            load_reward(cfg[section], None, "", None, 1, section)  # type: ignore[arg-type]
    cfg = load_config(["ppo.reward_models.helpfulness=/rm/h"])
    with pytest.raises(ConfigError, match=r"ppo\.reward_models\.safety is empty"):
        load_reward(cfg.ppo, None, "", None, 1, "ppo")  # type: ignore[arg-type]


class _Rm:
    """A stand-in Scorer: fixed raw scores, and the sequences it was asked to score."""

    def __init__(self, scores: list[float], max_len: int):
        self.scores, self.max_len, self.seen = scores, max_len, []

    def score_ids(self, seqs):
        self.seen = [list(s) for s in seqs]
        return torch.tensor(self.scores[:len(seqs)])


def test_ppo_reward_function_is_the_combined_reward():
    # Raw scores x give R = sigmoid(x), so logit(R_c) is the chosen raw score. σ(-3) = 0.047 < 0.15: R_s;
    # σ(1) = 0.73 untagged: R_h; tagged: R_s whatever R_h.
    helpful, safe = _Rm([2.0, 2.0, 2.0], max_len=4), _Rm([-3.0, 1.0, 1.0], max_len=3)
    reward = combined_reward(helpful, safe, cfg=CombinedRewardConfig())
    got = reward([[1, 5], [1, 6], [1, 7, 8]], [[9, 2], [9, 2], [4, 2]], [False, False, True])
    assert got.tolist() == [-3.0, 2.0, 1.0]
    # Each RM reads the dialog as generated (closed by its EOS), cut to its own length from the left.
    assert helpful.seen == [[1, 5, 9, 2], [1, 6, 9, 2], [7, 8, 4, 2]]
    assert safe.seen == [[5, 9, 2], [6, 9, 2], [8, 4, 2]]
    # The loop whitens that (components/ppo/experience.py): the batch's mean and std.
    x = torch.tensor([-3.0, 2.0, 1.0], dtype=torch.float64)
    assert Whitener("batch")(got).tolist() == pytest.approx(((x - x.mean()) / x.std(unbiased=False)).tolist(),
                                                            rel=1e-4)


def test_moved_keys_point_at_keys_of_the_schema():
    from omegaconf import OmegaConf

    from kubellama.components.core.recipe.config import load_config
    from kubellama.conf.schema.moved import MOVED, REMOVED

    cfg = load_config([])
    for old, new in MOVED.items():
        assert OmegaConf.select(cfg, new) is not None, new
        assert OmegaConf.select(cfg, old) is None, old
    assert all(OmegaConf.select(cfg, key) is None for key in REMOVED)
    # Each stage keeps its own paper default (§3.2.3: rejection sampling at T = 1.2).
    assert (cfg.ppo.sampling.temperature, cfg.rejection_sampling.sampling.temperature) == (1.0, 1.2)
