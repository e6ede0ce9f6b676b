"""Ghost Attention: instruction families, the GAtt set's structure, prompt fitting, and the stage raising turn-8
adherence on the tiny model (through kfp.local, as a one-stage pipeline)."""
from __future__ import annotations

import glob
import json
import os
import random

import numpy as np
import pytest
from test_sft_support import make_data, sft_overrides

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.gatt import adherence, families
from kubellama.components.gatt.data import Dialog, assign, build, fit_turns, read_dialogs
from kubellama.pipelines import run
from kubellama.pipelines.cli import main as cli

WORDS = ["Indeed", "Sure"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("gatt")))


def test_families_check_and_enforce():
    rng = random.Random(0)
    inst = families.make("first_word", rng, WORDS)
    word = inst.text.split()[-1].rstrip(".")
    assert word in WORDS and inst.check(f"{word}! Fine.") and inst.check(f"  {word.lower()}, yes")
    assert not inst.check("Well, no.") and not inst.check("")
    assert inst.check(inst.enforce("Kala sala."))
    caps = families.make("caps", rng, WORDS)
    assert caps.check("KALA, SALA 42.") and not caps.check("Kala sala.") and caps.check(caps.enforce("Kala sala."))
    combo = families.make("combo", rng, WORDS)
    assert combo.check is None and len(combo.text.split(". ")) == 2
    assert {families.make(f, rng, WORDS).family for f in ("hobby", "language", "figure")} == {
        "hobby", "language", "figure"}
    with pytest.raises(ConfigError, match="gatt.families: unknown instruction family 'poetry'"):
        families.validate(["hobby", "poetry"], WORDS)
    with pytest.raises(ConfigError, match="gatt.first_words"):
        families.validate(["first_word"], ["two words"])


def test_fit_turns_keeps_the_first_and_the_last():
    assert fit_turns(6, lambda kept: 10 * len(kept), 60) == [0, 1, 2, 3, 4, 5]
    assert fit_turns(6, lambda kept: 10 * len(kept), 35) == [0, 4, 5]
    assert fit_turns(6, lambda kept: 10 * len(kept), 15) is None


def test_gatt_set_has_the_instruction_in_the_first_turn_only_and_loss_on_the_last_answer(tmp_path, data):
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    dialogs = read_dialogs(os.path.join(data, "sft", "dialogs", "train.jsonl"), min_turns=2)
    assert dialogs and all(len(d.answers) >= 2 for d in dialogs)
    dialogs.append(Dialog(None, [f"Kala sala {i}?" for i in range(12)], [f"Sala kala {i}." for i in range(12)]))
    assign(dialogs, ["first_word", "end_word"], WORDS, seed=0)
    url = str(tmp_path / "set")
    stats = build(url, {"train": dialogs, "eval": []}, tok, 128, enforce=True)
    assert storage.is_complete(url) and stats["train"]["examples"] == len(dialogs)
    assert stats["train"]["families"] == {"first_word": (len(dialogs) + 1) // 2, "end_word": len(dialogs) // 2}
    records = [json.loads(x) for x in storage.read_text(f"{url}/train.jsonl").splitlines()]
    for rec in records:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert users[0].endswith(" " + rec["instruction"])
        assert all(rec["instruction"] not in u for u in users[1:])
        if rec["family"] == "first_word":  # given answers made to comply, every one of them
            word = rec["instruction"].split()[-1].rstrip(".")
            assert all(a.startswith(f"{word}, ") for a in answers)
    # The 12-turn dialog lost middle turns to fit 128 tokens: its first and last stay.
    kept = [m["content"] for m in records[-1]["messages"] if m["role"] == "user"]
    assert kept[0].startswith("Kala sala 0?") and kept[-1] == "Kala sala 11?" and len(kept) < 12
    # In the shards: IGNORE on every token before the last turn, the last answer trained.
    reader = ShardReader(f"{url}/train")
    examples = 0
    for i in range(reader.total_rows):
        row = reader.row(i)
        for seg in set(row["segments"].tolist()) - {-1}:
            at = row["segments"] == seg
            tokens, labels, turns = row["tokens"][at], row["labels"][at], row["turns"][at]
            assert np.all(labels[turns > 0] == IGNORE)
            last = turns == 0
            trained = labels[last] != IGNORE
            assert trained.any() and np.array_equal(labels[last][trained], tokens[last][trained])
            assert tok.decode(tokens[last][trained]).strip() == records[seg]["messages"][-1]["content"]
            examples += 1
    assert examples == len(records)


def test_prompts_keep_the_instruction_turn_when_the_context_is_full(data):
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    users = ["Kala sala? Begin every answer with the word Sure."] + [f"Nela lola {i}?" for i in range(19)]
    answers = [f"Sure, lola {i}." for i in range(19)]
    ids = adherence.prompt_ids(tok, None, users, answers, limit=100)
    text = tok.decode(ids)
    assert len(ids) <= 100 and "Begin every answer with the word Sure." in text and text.endswith("Nela lola 18? [/INST]")
    assert "Nela lola 17? [/INST] Sure, lola 18." in text and "Nela lola 3?" not in text


def test_gatt_raises_turn8_adherence_over_the_sft_model(tmp_path, data, capsys):
    """SFT briefly, then GAtt from it as the one-stage pipeline `gatt` (kfp.local, the SFT output imported)."""
    root = str(tmp_path / "runs")
    assert cli(["sft", *sft_overrides(), f"sft.data={data}", f"run.root={root}", "run.id=t", "sft.max_steps=20"]) == 0
    sft_out = json.loads(capsys.readouterr().out)["output"]
    # caps: its held-out instruction (the eval asks for held-out values, issue 21 defect 9) is the trained one; a
    # model this small and this briefly trained does not learn to copy a start word it never saw.
    gatt = sft_overrides("gatt", families="[caps]", min_turns=1,
                         eval_turns="[1,2,4,8]", eval_dialogs=16, eval_max_new_tokens=6, epochs=4, lr=5e-3)
    assert run.run_main(["--pipeline", "gatt", *gatt, f"gatt.data={data}", f"gatt.init={sft_out}",
                         f"run.root={root}", "run.id=g"]) == 0, capsys.readouterr().err
    out = os.path.join(root, "g", "gatt")
    report = storage.read_json(os.path.join(out, "report.json"))
    before, after = report["adherence_before"], report["adherence_after"]
    assert set(before) == set(after) == {"1", "2", "4", "8"}
    # The SFT model never opens with the instruction's word; after GAtt it does, 8 turns on.
    assert before["8"] == 0.0 and after["8"] >= 0.25
    assert report["lineage"]["parent"].startswith(os.path.join(sft_out, "checkpoints"))
    md = storage.read_text(os.path.join(out, "report.md"))
    assert "adherence before (turn: rate)" in md and f"8: {after['8']:.0%}" in md
    assert storage.read_bytes(os.path.join(out, "adherence.png")).startswith(b"\x89PNG")
    # The KFP step published the figures as Metrics.
    (metrics,) = glob.glob(os.path.join(root, "kfp", "*", "gatt", "executor_output.json"))
    with open(metrics) as f:
        meta = json.load(f)["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert meta["adherence_after.8"] == after["8"]


def test_sampled_answers_come_from_the_model(tmp_path, data, capsys):
    """`gatt.answers=sample`: the set's answers are the init model's (random weights here), not the dialogs'; a
    family without a check keeps every dialog, and without a checkable family there is no adherence eval."""
    gatt = sft_overrides("gatt", families="[hobby]", answers="sample", max_dialogs=6, min_turns=2, max_new_tokens=5,
                         temperature=1.0, max_steps=1)
    assert cli(["gatt", *gatt, f"gatt.data={data}", f"run.root={tmp_path}", "run.id=s"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adherence_before"] == {} == summary["adherence_after"] and summary["gatt_examples"] == 6
    given = {tuple(d.users): d.answers for d in read_dialogs(os.path.join(data, "sft", "dialogs", "train.jsonl"), 2)}
    records = [json.loads(x) for x in storage.read_text(os.path.join(summary["gatt_set"], "train.jsonl")).splitlines()]
    assert len(records) == 6
    for rec in records:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        original = (users[0][:-len(rec["instruction"]) - 1], *users[1:])
        assert rec["answers"] == "sampled" and answers != given[original]
    assert "No checkable family" in storage.read_text(os.path.join(tmp_path, "s", "gatt", "report.md"))
