"""The world's figures: intervals by hand, figures of hand-made items, greedy probes and the multi-turn converse on a
real tiny model, the report sections and `kubellama show`."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.io.report import figure, world_section
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.world import build, evaluate, stats
from kubellama.components.core.world.instructions import begins_with
from kubellama.components.data_prep.pack import train_tokenizer
from kubellama.components.safety_eval.run_page import did
from kubellama.conf.schema.data import WorldConfig
from kubellama.conf.schema.model import ModelConfig
from kubellama.pipelines import show


def test_wilson_and_bootstrap_by_hand() -> None:
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)  # Wilson's 95% interval for 8/10
    assert stats.wilson(0, 0) == (0.0, 1.0)
    r = stats.rate([True] * 8 + [False] * 2)
    assert r["value"] == 0.8 and r["n"] == 10 and r["ci"] == [0.4902, 0.9433]
    m = stats.mean([1.0, 2.0, 3.0, 4.0])
    assert m["value"] == 2.5 and m["ci"][0] < 2.5 < m["ci"][1] and stats.mean([1.0, 2.0, 3.0, 4.0]) == m
    rise = stats.before_after(stats.rate([False] * 50), stats.rate([True] * 50))
    flat = stats.before_after(stats.rate([True, False] * 25), stats.rate([True, False] * 25))
    assert stats.clear_rise(rise) and not stats.clear_rise(flat) and rise["n"] == 50


def test_figures_of_hand_made_items() -> None:
    items = {"tasks": [{"family": "add", "correct": True, "empty": False, "length": 2},
                       {"family": "add", "correct": False, "empty": True, "length": 0},
                       {"family": "sort", "correct": True, "empty": False, "length": 4}],
             "safety": [{"harmful": True, "refused": True, "empty": False, "length": 6},
                        {"harmful": False, "refused": True, "empty": False, "length": 6},
                        {"harmful": False, "refused": False, "empty": False, "length": 4}]}
    f = evaluate.figures(items, families=["add"])
    assert f["accuracy"]["value"] == pytest.approx(2 / 3) and f["accuracy"]["n"] == 3
    assert f["accuracy_band"]["value"] == 0.5 and f["accuracy_band"]["n"] == 2
    assert f["empty_rate"]["value"] == pytest.approx(1 / 6)
    assert f["mean_length"]["value"] == pytest.approx(22 / 6)
    assert f["refusal_harmful"]["value"] == 1.0 and f["false_refusal"]["value"] == 0.5
    assert evaluate.band(items["tasks"], 0.2, 0.8) == ["add"]
    world = evaluate.compare(f, f)
    assert set(world) == set(evaluate.METRICS) and world["accuracy"]["before"] == world["accuracy"]["after"]


@pytest.fixture(scope="module")
def tiny() -> tuple[Llama, Tokenizer, dict]:
    sets = build.build(WorldConfig(sft=20, pairs=10, eval=3, calib=3, dialogs=4, eval_dialogs=2), 0)
    text = sets["pretrain"] + [m["content"] for d in sets["sft"] for m in d["messages"]]
    tok = Tokenizer(model_bytes=train_tokenizer(text, vocab_size=400))
    torch.manual_seed(0)
    model = Llama(ModelConfig(name="t", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                              vocab_size=400, max_seq_len=160))
    return model, tok, sets


def test_probe_answers_every_held_out_prompt_and_converse_keeps_the_instruction(tiny) -> None:
    model, tok, sets = tiny
    safe = [r for r in sets["eval_safety"] if r["harmful"]][:2] + [r for r in sets["eval_safety"] if not r["harmful"]][:2]
    probe = evaluate.Probe(sets["eval_tasks"], safe)
    items = probe(model, tok)
    assert len(items["tasks"]) == len(sets["eval_tasks"]) and len(items["safety"]) == 4
    assert all(0 <= t["length"] <= evaluate.MAX_NEW_TOKENS for t in items["tasks"] + items["safety"])
    # The same prompts, the same greedy answers.
    assert probe(model, tok) == items
    # A dialog longer than the context: middle turns go, the first (the instruction's) stays.
    instruction = begins_with("Yes")
    turns = evaluate.converse(model, tok, instruction.text, [r["prompt"] for r in sets["eval_dialogs"][0]], 8)
    assert len(turns) == len(sets["eval_dialogs"][0])
    kept = [k for _, k in turns]
    assert kept[0] == 1 and kept[1] == 2 and min(kept[1:]) >= 2 and kept[-1] < len(turns)
    shown = evaluate.showcase(model, tok, probe, sets["eval_dialogs"][0], instruction, turn=8)
    assert [e["kind"] for e in shown] == ["task", "instruction, turn 8", "harmful", "benign look-alike"]


def test_report_sections_and_show(tmp_path) -> None:
    m = stats.before_after(stats.rate([False] * 20), stats.rate([True] * 15 + [False] * 5))
    sec = world_section({"accuracy": m})
    assert sec.tables[0].rows[0][:4] == ["accuracy", "0.000 [0.000, 0.161]", "0.750 [0.531, 0.888]", 20]
    assert figure(None) == "n/a"
    page = did([("data_prep", "data_prep", {"world": {"counts": {"sft": 3}, "eval": "/d/world/eval"}}),
                ("sft", "sft", {"world": {"accuracy": m}}),
                ("safety_eval", "safety_eval", {"world": {"ppo": {"accuracy": stats.rate([True])}},
                                                "gate_by_model": {"ppo": True}})])
    assert page is not None
    rows = page.tables[0].rows
    assert rows[0][0] == "sft" and rows[0][-1] == "rose" and ["safety_eval: ppo", "gate", "", "pass", "", ""] in rows
    run = tmp_path / "run"
    os.makedirs(run / "safety_eval")
    example = {"kind": "task", "prompt": "What is 2 + 3?", "answer": "5", "ok": True}
    (run / "safety_eval" / "report.json").write_text(json.dumps({
        "model": "ppo", "gate_by_model": {"pretrain": False, "ppo": True},
        "world_examples": {"pretrain": [{**example, "answer": "", "ok": False}], "ppo": [example]},
        "world": {"ppo": {"accuracy": stats.rate([True])}}}))
    text = "\n".join(show.lines(str(run)))
    assert "== pretrain (the safety gate fails it)" in text and "== ppo (the safety gate passes it)" in text
    assert "== What each stage did" in text and "safety_eval: ppo" in text
    assert "(empty)   [WRONG]" in text and "-> 5   [right]" in text and "accuracy 1.000" in text
    assert show.main([str(tmp_path / "nowhere")]) == 2
