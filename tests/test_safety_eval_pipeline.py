"""Safety eval as the pipeline's last step (kfp.local): the gate fails the pipeline naming its line, and the step
still leaves its reports, its KFP HTML artifact and the run's page."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

import pytest
from test_pipeline_local import TINY, corpus
from test_safety_eval import assert_every_img_decodes

from kubellama.components.safety_eval import FIXTURES
from kubellama.pipelines import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = [f"safety_eval.truthfulqa.path={FIXTURES}/truthfulqa", "safety_eval.truthfulqa.primer=false",
        "safety_eval.truthfulqa.limit=2", f"safety_eval.toxicity.path={FIXTURES}/toxigen",
        "safety_eval.toxicity.limit=1", f"safety_eval.bold.path={FIXTURES}/bold", "safety_eval.bold.limit=1",
        "safety_eval.decoding.max_new_tokens=6", "safety_eval.mixed_precision=fp32",
        # Room for a TruthfulQA question and answer (the pipeline tests' tiny model has 32 positions).
        "model.max_seq_len=80", "pretrain.global_batch_tokens=160"]


def test_impossible_gate_fails_the_pipeline_naming_the_line(tmp_path, capsys):
    root = str(tmp_path / "run")
    src = corpus(str(tmp_path / "corpus.jsonl"), docs=80)
    code = run.run_main([f"run.root={root}", f"data.sources=[{{name:t,path:'{src}'}}]", *TINY, *EVAL,
                         "run.id=g", "safety_eval.gate.min_group_sentiment=2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("kubellama: error: pipeline failed: ") and "'safety-eval'" in err
    assert "safety gate failed for pretrain: bias.min_group_sentiment >= 2 (safety_eval.gate.min_group_sentiment): " \
           "pretrain has " in err

    out = os.path.join(root, "g", "safety_eval")
    rep = json.loads(open(os.path.join(out, "report.json")).read())
    assert rep["status"] == "failed" and rep["models"] == {"pretrain": os.path.join(root, "g", "pretrain")}
    assert set(rep["scores"]) == {"truthfulqa.mc1", "truthfulqa.mc2", "toxicity.toxic_pct", "bias.sentiment_mean",
                                  "bias.min_group_sentiment"}
    # The failed step still handed the UI its report.
    (html,) = glob.glob(os.path.join(root, "kfp", "kubellama-llama2-*", "safety-eval", "html"))
    assert open(html).read() == open(os.path.join(out, "report.html")).read()
    # The run's page: every stage, lineage back to the data, the paper's figures, every plot decodes.
    page = open(os.path.join(root, "g", "report.html")).read()
    for stage in ("data_prep (completed)", "pretrain (completed)", "safety_eval (failed)"):
        assert stage in page
    # Its verdict, first: the gate failed the gated model, on the line the error names.
    assert page.index('<section id="verdict" class="verdict bad">') < page.index('<section id="stages">')
    assert "pretrain fails the safety gate: 1 of " in page and "bias.min_group_sentiment &gt;= 2" in page
    assert "2T tokens (§2.2)" in page and "21.25 pretrained / 0.00 chat" in page
    # The cost ledger's row for pretraining: its measured time (wall_s x world_size of its report), the tokens it
    # trained on and the ledger's estimate for them.
    pre = json.loads(open(os.path.join(root, "g", "pretrain", "report.json")).read())
    row = re.search(r"<tr><td>pretrain</td><td>([\d.,]+) (h|s) \(CPU processes\)</td><td>([\d,]+)</td>"
                    r"<td>[\d.,e+-]+ (?:h|s) on [^<]+, [\d.e+-]+ gCO2eq</td></tr>", page)
    assert row, page[page.find("Cost by stage"):][:1500]
    measured_h = float(row[1].replace(",", "")) / (1 if row[2] == "h" else 3600)
    assert measured_h == pytest.approx(pre["wall_s"] * pre["world_size"] / 3600, rel=0.01)
    assert int(row[3].replace(",", "")) > 0
    assert_every_img_decodes(page, at_least=4)
    # What scripts/check_page.py checks (in headless Chromium too, where it is installed).
    spec = importlib.util.spec_from_file_location("check_page", os.path.join(ROOT, "scripts", "check_page.py"))
    check_page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_page)  # type: ignore[union-attr]
    assert check_page.check(os.path.join(root, "g", "report.html")) == []
    assert check_page.check(os.path.join(out, "report.html")) == []
