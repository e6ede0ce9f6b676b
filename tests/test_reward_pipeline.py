"""The reward models in the pipeline: two parallel steps (helpfulness || safety) after the newest model-making
stage, their config parameters, their outputs, and a kfp.local run of data prep -> pretrain -> both RMs."""
from __future__ import annotations

import json
import os

import pytest
from test_pipeline import FIRST, compile_docs, step_configs
from test_pipeline_local import TINY, corpus, executor_output, outputs
from test_reward_support import write_jsonl

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import stages
from kubellama.pipelines import llama2, run

# SFT, GAtt and safety eval off: these tests are about the reward models starting from pretraining (or a configured
# checkpoint).
NO_SFT = ["pipeline.stages.sft=false", "pipeline.stages.gatt=false", "pipeline.stages.safety_eval=false",
          "pipeline.stages.rejection_sampling=false", "pipeline.stages.ppo=false"]


def test_both_reward_models_run_side_by_side_after_pretraining(tmp_path):
    _, docs = compile_docs(tmp_path, ["reward.lr=2e-5", *NO_SFT])
    spec = docs[0]
    tasks = spec["root"]["dag"]["tasks"]
    for kind in ("helpfulness", "safety"):
        task = tasks[f"reward-{kind}"]
        assert task["taskInfo"]["name"] == f"reward model ({kind})"
        assert sorted(task["dependentTasks"]) == ["data-prep", "pretrain", FIRST]  # not on each other: parallel
        arts = task["inputs"]["artifacts"]
        assert arts["init"]["taskOutputArtifact"] == {"outputArtifactKey": "model", "producerTask": "pretrain"}
        assert arts["data"]["taskOutputArtifact"] == {"outputArtifactKey": "dataset", "producerTask": "data-prep"}
        config = json.loads(step_configs(spec)[f"reward_{kind}"])
        assert sorted(config) == ["cluster", "model", "reward", "run"]
        assert config["reward"]["kind"] == kind and config["reward"]["lr"] == 2e-5


def test_model_inputs_come_from_the_newest_stage_in_the_pipeline():
    (init,) = [i for i in stages.get("reward").inputs if i.name == "init"]
    assert init.sources == ("gatt", "sft", "pretrain")
    assert llama2.producer(init, {"pretrain": "p"}) == "pretrain"
    assert llama2.producer(init, {"pretrain": "p", "sft": "s"}) == "sft"
    assert llama2.producer(init, {"pretrain": "p", "sft": "s", "gatt": "g"}) == "gatt"
    assert llama2.producer(init, {"data_prep": "d"}) is None
    # Steps of a stage with variants are sources too (a later stage reading the safety RM).
    assert stages.producer("reward_safety") is stages.get("reward") and stages.producer("nope") is None


def test_skipped_pretraining_starts_the_reward_models_from_config(tmp_path):
    overrides = ["pipeline.stages.pretrain=false", "reward.init=s3://b/sft/hf", *NO_SFT]
    text = run.dag_text(run.resolve(overrides), overrides)
    assert "import s3://b/sft/hf" in text and text.count("importer") == 3  # one importer, read by both steps
    with pytest.raises(ConfigError, match="'pipeline.init_checkpoint' is empty"):
        compile_docs(tmp_path, ["pipeline.stages.pretrain=false", *NO_SFT])


def test_skipped_reward_stage_needs_the_reward_models_given(tmp_path):
    # A policy checkpoint (pipeline.init_checkpoint) is no stand-in for a reward model.
    base = ["pipeline.stages.pretrain=false", "pipeline.stages.reward=false", "pipeline.init_checkpoint=s3://b/sft",
            "pipeline.stages.sft=false", "pipeline.stages.gatt=false", "pipeline.stages.ppo=false",
            "pipeline.stages.safety_eval=false"]
    with pytest.raises(ConfigError, match="'rejection_sampling.reward_models.helpfulness' is empty.*reward"):
        run.dag_text(run.resolve(base), base)
    given = [*base, "rejection_sampling.reward_models.helpfulness=s3://b/rm-h",
             "rejection_sampling.reward_models.safety=s3://b/rm-s"]
    text = run.dag_text(run.resolve(given), given)
    assert "import s3://b/rm-h" in text and "import s3://b/rm-s" in text and "import s3://b/sft" in text


def test_each_reward_model_writes_its_own_folder():
    cfg = run.resolve(["run.id=r", "run.root=/x"])
    found = run.local_outputs(cfg, ["pretrain", "reward"])
    assert found == {"pretrain": "/x/r/pretrain", "reward_helpfulness": "/x/r/reward_helpfulness",
                     "reward_safety": "/x/r/reward_safety"}


def test_kfp_local_run_trains_both_reward_models_from_the_pretrained_model(tmp_path, capsys):
    root = str(tmp_path / "run")
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=100)
    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), [
        {"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": "No idea."} for i in range(40)])
    harm = write_jsonl(str(tmp_path / "harm.jsonl"), [{"prompt": f"Do harm {i}"} for i in range(40)])
    overrides = [
        f"run.root={root}", f"data.sources=[{{name:t,path:'{src}'}}]", *[o for o in TINY if "reward" not in o],
        f"data.preference.sources=[{{name:p,path:'{pairs}'}}]", "data.preference.eval_fraction=0.25",
        f"data.preference.synthetic_safety=[{{name:h,path:'{harm}'}}]", "reward.pairs_per_batch=4",
        "reward.micro_batch=2", "reward.max_steps=2", "reward.log_every=1", "reward.eval_batch=32"]
    assert run.run_main(overrides) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    pretrained = outputs(out)["pretrain"]
    kfp_root = os.path.join(root, "kfp")
    for kind in ("helpfulness", "safety"):
        folder = os.path.join(os.path.dirname(pretrained), f"reward_{kind}")
        assert f"  reward_{kind}: {folder}\n" in out and f"  {folder}/report.md\n" in out
        report = storage.read_json(os.path.join(folder, "report.json"))
        assert report["kind"] == kind and report["step"] == 2 and report["accuracy"] is not None
        # Started from the pretraining step's newest checkpoint.
        assert report["lineage"]["parent"].startswith(os.path.join(pretrained, "checkpoints"))
        (model,) = executor_output(kfp_root, f"reward-{kind}")["artifacts"]["model"]["artifacts"]
        assert model["metadata"]["url"] == folder and model["metadata"]["hf"] == os.path.join(folder, "hf")
        (metrics,) = executor_output(kfp_root, f"reward-{kind}")["artifacts"]["metrics"]["artifacts"]
        assert metrics["metadata"]["accuracy"] == report["accuracy"]
    safety = storage.read_json(os.path.join(os.path.dirname(pretrained), "reward_safety", "report.json"))
    # Each step ran with its own settings: the safety RM with its auxiliary loss (on by default), the other without.
    assert "unsafe_recall_at_0_5" in safety and "unsafe_recall_at_rule" in safety and safety["aux_loss_weight"] == 1.0
    assert storage.read_json(os.path.join(os.path.dirname(pretrained), "reward_helpfulness",
                                          "report.json"))["aux_loss_weight"] == 0.0
