"""PPO against ground truth (issue 21): on a data prep output with the world on, the stage reports `world` figures
of its init and of the policy it exports, `accuracy_band` over families picked on the calibration split (never the
eval split); the rule reward (`ppo.reward=rule`) needs no reward models and refuses prompts without an answer."""
from __future__ import annotations

import json
import os

import pytest
from test_trainer_support import spawn
from test_world import SMALL, world_data

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.core.rlhf.rule import answers
from kubellama.components.core.world import evaluate, sets
from kubellama.components.ppo import stage
from kubellama.pipelines.cli import main as cli

MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=400, max_seq_len=128)
PPO = [f"model.{k}={v}" for k, v in MODEL.items()] + [
    "ppo.lr=1e-3", "ppo.prompts_per_batch=8", "ppo.minibatch=4", "ppo.micro_batch=4",
    "ppo.sampling.max_new_tokens=8", "ppo.max_steps=2", "ppo.heldout_prompts=4", "ppo.eval_every=1",
    "ppo.mixed_precision=fp32", "ppo.ckpt_every=1", "ppo.patience=0", "ppo.reward=rule", "ppo.max_empty_rate=1.0",
    "ppo.min_length_ratio=0"]
METRICS = ("accuracy", "empty_rate", "mean_length", "refusal_harmful", "false_refusal", "accuracy_band")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return world_data(str(tmp_path_factory.mktemp("ppo_world")), SMALL, MODEL["vocab_size"], seed=3, docs=40)


def test_ppo_reports_world_figures_with_the_band_picked_on_calib(tmp_path, data, monkeypatch):
    calib = sets.read(str(sets.eval_url(data, "calib")))
    evals = sets.read(str(sets.eval_url(data, "tasks")))
    seen: list[list[str]] = []
    band, task_items = evaluate.band, evaluate.task_items

    def with_prompts(model, tok, records):  # type: ignore[no-untyped-def]
        return [{**t, "prompt": r["prompt"]} for t, r in zip(task_items(model, tok, records), records)]

    def every_family(items, lo=0.2, hi=0.8):  # type: ignore[no-untyped-def]
        """Records which prompts the band is picked on; a random init solves nothing, so every family is taken."""
        seen.append([t["prompt"] for t in items])
        assert band(items, lo, hi) is not None
        return sorted({t["family"] for t in items})

    monkeypatch.setattr(evaluate, "task_items", with_prompts)
    monkeypatch.setattr(evaluate, "band", every_family)
    args = ["ppo", *PPO, f"run.root={tmp_path}", "run.id=w", f"ppo.data={data}"]
    assert cli(args) == 0
    out = os.path.join(str(tmp_path), "w", "ppo")
    report = json.load(open(os.path.join(out, "report.json")))
    world = report["world"]
    assert set(METRICS) <= set(world)
    for m in METRICS:
        assert set(world[m]) >= {"before", "after", "n"}, m
        for side in ("before", "after"):
            assert set(world[m][side]) == {"value", "ci"} and len(world[m][side]["ci"]) == 2, (m, side)
    # The band is picked once, on the calibration split's items (not the eval split's), and listed.
    assert seen == [[r["prompt"] for r in calib]] and not {r["prompt"] for r in calib} & {r["prompt"] for r in evals}
    assert world["accuracy_band"]["families"] == sorted({r["family"] for r in calib})
    assert world["accuracy"]["n"] == len(evals)
    before = json.load(open(os.path.join(out, "world_before.json")))
    assert before["families"] == world["accuracy_band"]["families"] and len(before["calib"]) == len(calib)
    # Held out under the rule reward: the calibration split's prompts, which carry answers; no RM was loaded.
    assert report["heldout_prompts_file"].endswith(os.path.join("world", "eval", "calib.jsonl"))
    # A rerun resumes the finished run and reports the same "before" (kept, not recomputed).
    assert cli(args) == 0
    assert len(seen) == 1
    again = json.load(open(os.path.join(out, "report.json")))["world"]
    assert again["accuracy"]["before"] == world["accuracy"]["before"]


def test_ppo_families_restrict_the_training_prompts(tmp_path, data):
    args = ["ppo", *PPO, f"run.root={tmp_path}", "run.id=f", f"ppo.data={data}", "ppo.families=[add]",
            "ppo.max_steps=1"]
    assert cli(args) == 0
    report = json.load(open(os.path.join(str(tmp_path), "f", "ppo", "report.json")))
    ppo = [json.loads(x) for x in open(os.path.join(data, "prompts", "ppo.jsonl"))]
    assert report["train_prompts"] == len({r["prompt"] for r in ppo if r.get("family") == "add"})
    assert set(report["world"]["accuracy_band"]["families"]) <= {"add"}


def test_rule_reward_refuses_prompts_without_an_answer():
    with pytest.raises(KubellamaError, match=r"data/prompts/ppo\.jsonl: .*has no 'answer'"):
        answers([Prompt([1, 5], messages=[{"role": "user", "content": "hi"}])], "data/prompts/ppo.jsonl")


def test_unknown_reward_is_refused(tmp_path, data, capsys):
    assert cli(["ppo", *PPO, f"run.root={tmp_path}", f"ppo.data={data}", "ppo.reward=oracle"]) == 2
    assert "ppo.reward='oracle'" in capsys.readouterr().err


def _two_ranks(env, args: list[str], out: str) -> None:  # type: ignore[no-untyped-def]
    summary = stage.train(load_config(args))
    if env.lead:
        with open(out, "w") as f:
            json.dump(summary["world"], f)


def test_two_ranks_report_the_one_rank_world_before(tmp_path, data):
    """Under torch.distributed every rank probes the consolidated policy (collectives in step): the same "before"
    as one rank, and the figures come back."""
    args = [*PPO, f"ppo.data={data}", "ppo.max_steps=1", "run.id=r"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert cli(["ppo", *args, f"run.root={tmp_path}", f"ppo.output={one}"]) == 0
    spawn(_two_ranks, 2, [*args, f"run.root={tmp_path}", f"ppo.output={two}"], str(tmp_path / "two.json"))
    got = json.load(open(tmp_path / "two.json"))
    first = json.load(open(os.path.join(one, "report.json")))["world"]
    assert {m: got[m]["before"] for m in METRICS} == {m: first[m]["before"] for m in METRICS}
    assert got["accuracy_band"]["families"] == first["accuracy_band"]["families"]
