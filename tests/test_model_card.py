"""Model cards: a README.md with Hugging Face front matter beside every HF export, following the stage's report and
the safety eval, and claiming nothing the reports do not hold."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kubellama.components.core.io import card, cards
from kubellama.components.core.io.report import figure
from kubellama.components.core.launch import launcher
from kubellama.components.core.model import hf
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.train import checkpoint, dist
from kubellama.conf.schema.model import ModelConfig
from kubellama.pipelines.cli import main as cli

MODEL = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=32)
CFG = ModelConfig(name="tiny", **MODEL)
LINEAGE = {"config_hash": "c0ffee12", "data_hash": "da7a5eed", "parent": "/runs/r1/sft/checkpoints/step_0000034",
           "step": 12}
WORLD = {"accuracy": {"before": {"value": 0.178, "ci": [0.153, 0.207]}, "after": {"value": 0.1327, "ci": [0.11, 0.159]},
                      "n": 761}}
SAFETY_SCORES = {"toxicity.toxic_pct": {"ppo": 0.0, "sft": 1.5},
                 "truthfulqa.mc2": {"ppo": 0.838518272082214, "sft": 0.85}}


def report(**extra) -> dict:
    return {"status": "completed", "beta": 0.01, "iterations": 12, "kl_last": 6.888350009918213,
            "stopped_early": False, "reward_first": -2.2449951345120382, "reward_last": -1.8430175518255019,
            "start_iteration": 0, "ended": 1.7e9, "world_size": 1, "lineage": LINEAGE, "world": WORLD, "run_id": "r1",
            "report_json": "/runs/r1/ppo/report.json", **extra}


def table(body: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after `heading`: first cell -> the other cells (header row left out)."""
    rows: list[str] = []
    for line in body.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in rows[2:]]
    return {c[0]: c[1:] for c in cells}


def facts(**extra) -> dict:
    return {"stage": "ppo", "license": "Apache-2.0", "license_from": "run.license",
            "data": {"url": "/runs/data/ab12", "report": "/runs/data/ab12/report.json", "world": True,
                     "sources": [{"name": "c4", "set": "pretrain", "path": "hf://datasets/allenai/c4/en/x.json.gz",
                                  "license": "ODC-BY-1.0"},
                                 {"name": "wiki", "set": "pretrain", "path": "/data/wiki.txt", "license": None}]},
            **extra}


def test_card_front_matter_parses_and_its_figures_are_the_reports():
    rep = report()
    meta, body = card.parse(card.text(LINEAGE, rep, facts(), {"architectures": ["LlamaForCausalLM"]}))
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert "ppo" in meta["tags"] and meta["datasets"] == ["allenai/c4"]  # a Hub source only, not the local path
    assert "base_model" not in meta  # a path parent is no Hub id: it goes under kubellama, not base_model
    assert meta["kubellama"] == {"stage": "ppo", "parent": LINEAGE["parent"], "step": 12, "config_hash": "c0ffee12",
                                 "data_hash": "da7a5eed", "report": rep["report_json"], "safety_eval": None}
    figs = table(body, "## Figures")
    # Every top-level number of the report is there, as the report has it; bookkeeping and flags are not.
    expected = {"beta": 0.01, "iterations": 12, "kl_last": rep["kl_last"], "reward_first": rep["reward_first"],
                "reward_last": rep["reward_last"]}
    assert {k: v[0] for k, v in figs.items()} == {k: f"{v:.6g}" if isinstance(v, float) else str(v)
                                                  for k, v in expected.items()}
    world = table(body, "### Against the rule-checked world")
    assert world["accuracy"] == [figure(WORLD["accuracy"]["before"]), figure(WORLD["accuracy"]["after"]), "761"]
    model = table(body, "## Model")
    assert model["config hash"] == ["`c0ffee12`"] and model["data hash"] == ["`da7a5eed`"]
    assert model["parent"] == [f"`{LINEAGE['parent']}`"] and model["stage"] == ["`ppo`"]
    lic = table(body, "## License")
    assert lic["c4"][-1] == "ODC-BY-1.0" and lic["wiki"][-1] == "not stated"
    assert "**Apache-2.0** (run.license)" in body and "Not yet evaluated" in body
    assert "## Intended use" in body and "## Limits" in body


def test_card_states_no_figures_without_a_report_and_takes_hub_ids_and_odd_licenses():
    lineage = {**LINEAGE, "parent": "meta-llama/Llama-2-7b-hf"}
    meta, body = card.parse(card.text(lineage, None, {"stage": None, "license": "Llama 2 Community License"},
                                      {"architectures": ["LlamaForSequenceClassification"]}))
    assert meta["license"] == "other" and meta["license_name"] == "Llama 2 Community License"
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf" and meta["pipeline_tag"] == "text-classification"
    assert "this card states no figures" in body and "| beta" not in body and "not a text generator" in body


def export(tmp_path: Path, name: str = "ppo", lineage: dict | None = None) -> tuple[str, str]:
    """A stage output with an hf/ export (tiny weights, lineage) and its report.json: (output, hf)."""
    out = tmp_path / "r1" / name
    torch.manual_seed(0)
    hf.save_hf(Llama(CFG).state_dict(), CFG, str(out / "hf"), lineage=lineage or LINEAGE)
    (out / "report.json").write_text(json.dumps(report(hf=str(out / "hf"), report_json=str(out / "report.json"))))
    return str(out), str(out / "hf")


def data_prep(tmp_path: Path) -> str:
    data = tmp_path / "data"
    data.mkdir()
    (data / "report.json").write_text(json.dumps({
        "sources": [{"name": "wiki", "path": "/data/wiki.txt"}], "sft": {"sources": {"alpaca": 120}}}))
    return str(data)


def test_a_stage_run_through_the_launcher_writes_the_card_after_its_report(tmp_path):
    out, hf_dir = str(tmp_path / "r1" / "ppo"), str(tmp_path / "r1" / "ppo" / "hf")
    cfg = load_config([f"ppo.output={out}", f"ppo.data={data_prep(tmp_path)}", "run.id=r1",
                       "+run.data_licenses.wiki=CC-BY-SA-4.0"])
    seen = {}

    def train(c) -> dict:
        seen["card before the report"] = Path(hf_dir, card.CARD).exists()
        export(tmp_path)
        return json.loads(Path(out, "report.json").read_text())

    launcher.run(cfg, "ppo", train)
    assert seen == {"card before the report": False}
    meta, body = card.parse(Path(hf_dir, card.CARD).read_text())
    assert meta["license"] == "apache-2.0" and meta["kubellama"]["config_hash"] == "c0ffee12"
    lic = table(body, "## License")
    assert lic["wiki"] == ["pretrain", "`/data/wiki.txt`", "CC-BY-SA-4.0"] and lic["alpaca"][-1] == "not stated"
    assert table(body, "## Figures")["kl_last"] == [f"{report()['kl_last']:.6g}"]


def safety_report(tmp_path: Path, models: dict[str, str]) -> dict:
    return {"status": "completed", "model": "ppo", "models": models, "scores": SAFETY_SCORES,
            "gate": {"mode": "enforce", "passed": True,
                     "lines": [{"rule": "toxicity.toxic_pct <= 10", "status": "pass", "detail": "ppo has 0.00%"}]},
            "gate_by_model": {"ppo": True, "sft": False}, "decoding": "temperature 0.1", "run_id": "r1",
            "world": {"ppo": {"accuracy": {"value": 0.1327, "ci": [0.11, 0.159], "n": 761}}},
            "report_json": str(tmp_path / "r1" / "safety_eval" / "report.json")}


def test_the_safety_eval_refreshes_the_cards_of_the_models_it_scored(tmp_path):
    out, hf_dir = export(tmp_path)
    stage_cfg = load_config([f"ppo.output={out}", "run.license=MIT"])
    cards.after_stage(stage_cfg, "ppo", "ppo")
    assert "Not yet evaluated" in Path(hf_dir, card.CARD).read_text()
    foreign = tmp_path / "elsewhere"  # an HF folder kubellama did not card is left alone
    hf.save_hf(Llama(CFG).state_dict(), CFG, str(foreign))
    ev_out = tmp_path / "r1" / "safety_eval"
    ev_out.mkdir(parents=True)
    (ev_out / "report.json").write_text(json.dumps(safety_report(tmp_path, {"ppo": out, "other": str(foreign)})))
    written = cards.after_stage(load_config([f"safety_eval.output={ev_out}"]), "safety_eval", "safety_eval")
    assert written == [str(Path(hf_dir, card.CARD))] and not (foreign / card.CARD).exists()
    meta, body = card.parse(Path(hf_dir, card.CARD).read_text())
    assert meta["license"] == "mit"  # the stage's facts survive the refresh
    assert meta["kubellama"]["safety_eval"] == str(ev_out / "report.json")
    scores = table(body, "## Safety evaluation")
    assert scores == {k: [f"{v['ppo']:.6g}"] for k, v in SAFETY_SCORES.items()}
    assert "**passed**" in body and figure({"value": 0.1327, "ci": [0.11, 0.159]}) in body
    # The stage's card rewritten later (a rerun) keeps the evaluation while the weights are the same ...
    cards.after_stage(stage_cfg, "ppo", "ppo")
    assert "Not yet evaluated" not in Path(hf_dir, card.CARD).read_text()
    # ... and drops it once they are not.
    hf.save_hf(Llama(CFG).state_dict(), CFG, hf_dir, lineage={**LINEAGE, "step": 13})
    cards.after_stage(stage_cfg, "ppo", "ppo")
    assert "Not yet evaluated" in Path(hf_dir, card.CARD).read_text()


def test_export_hf_writes_a_card_carrying_the_sources_lineage_report_and_evaluation(tmp_path):
    model = [f"model.{k}={v}" for k, v in MODEL.items()]
    fresh = tmp_path / "fresh"
    assert cli(["export-hf", "--init", "--out", str(fresh), "run.license=MIT", *model]) == 0
    meta, body = card.parse((fresh / card.CARD).read_text())
    assert meta["license"] == "mit" and "fresh random weights" in body and "this card states no figures" in body
    assert not (fresh / hf.LINEAGE).exists()

    out, hf_dir = export(tmp_path)
    cards.after_stage(load_config([f"ppo.output={out}"]), "ppo", "ppo")
    cards.refresh_evaluated(safety_report(tmp_path, {"ppo": out}))
    copy = tmp_path / "copy"
    assert cli(["export-hf", "--checkpoint", hf_dir, "--out", str(copy), "--dtype", "bf16", *model]) == 0
    meta, body = card.parse((copy / card.CARD).read_text())
    assert json.loads((copy / hf.LINEAGE).read_text()) == LINEAGE
    assert meta["kubellama"]["config_hash"] == "c0ffee12" and "ppo" in meta["tags"]
    assert table(body, "## Figures")["reward_last"] == [f"{report()['reward_last']:.6g}"]
    assert table(body, "## Safety evaluation")["truthfulqa.mc2"] == [f"{SAFETY_SCORES['truthfulqa.mc2']['ppo']:.6g}"]
    assert "cast to bf16" in body


@pytest.mark.parametrize("parent,expected", [("/r/sft/checkpoints/step_0000034", "/r/sft"), ("/r/ppo/hf", "/r/ppo"),
                                             ("s3://b/r/gatt", "s3://b/r/gatt")])
def test_output_of_a_weights_url(parent, expected):
    assert cards.output_of(parent) == expected


def test_export_hf_of_a_training_step_carries_the_report_only_at_the_step_it_describes(tmp_path):
    out, _ = export(tmp_path)  # the stage's report describes step 12
    cards.after_stage(load_config([f"ppo.output={out}"]), "ppo", "ppo")
    for step in (5, 12):
        checkpoint.save(f"{out}/checkpoints", step, {"model": Llama(CFG).state_dict()}, {"scheduler": {}, "data": {}},
                        dist.init(), keep=2).finish()
    model = [f"model.{k}={v}" for k, v in MODEL.items()]
    for step, described in ((12, True), (5, False)):
        dest = tmp_path / f"step{step}"
        src = f"{out}/checkpoints/step_{step:07d}"
        assert cli(["export-hf", "--checkpoint", src, "--out", str(dest), *model]) == 0
        meta, body = card.parse((dest / card.CARD).read_text())
        assert meta["tags"][-1] == "ppo" and f"converted from `{src}`" in body
        assert ("this card states no figures" not in body) is described
        assert (dest / hf.LINEAGE).exists() is described
        assert meta["kubellama"]["config_hash"] == ("c0ffee12" if described else None)
