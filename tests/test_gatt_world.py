"""Issue 21, GAtt on the rule-checked world: the adherence eval's prompts fitted to the context never lose the
instruction turn (defect 9), the control arm carries no instruction, and the stage reports world.adherence_turn_N /
control_turn_N / gap_turn_N with the turns actually in context."""
from __future__ import annotations

import json
import os

import pytest
from test_sft_support import make_data, sft_overrides

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.io import storage
from kubellama.components.core.world import sets
from kubellama.components.gatt import adherence, families
from kubellama.conf.schema.gatt import GattConfig
from kubellama.pipelines.cli import main as cli

INSTRUCTION = "Begin every answer with the word Yes."
TURNS = [1, 2, 4]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("gatt_world")), dialogs=60, **{
        "data.world.enabled": "true", "data.world.sft": 10, "data.world.dialogs": 20, "data.world.eval_dialogs": 4,
        "data.world.max_turns": 6, "data.world.pretrain": 10, "data.world.pairs": 10, "data.world.safety_pairs": 10,
        "data.world.rs": 4, "data.world.ppo": 4, "data.world.calib": 4, "data.world.eval": 4,
        "data.world.safety_sft": 10})


@pytest.fixture(scope="module")
def tok(data) -> Tokenizer:
    return Tokenizer(os.path.join(data, "tokenizer.model"))


def test_the_instruction_turn_is_never_dropped_by_compaction(tok):
    """Fails before the fix: when the first and the last turn alone overflow the limit, the prompt kept the last
    turn only (or cut the dialog from its start), dropping the instruction."""
    first = "Kala sala nela lola kala sala nela lola kala sala? " + INSTRUCTION
    last = "Nela lola kala sala nela lola kala sala nela lola kala sala nela lola?"
    users = [first, "Lola?", last]
    answers = ["Yes, lola kala sala nela lola kala sala nela lola kala.", "Yes, lola."]
    for limit in (40, 48, 60):
        ids = adherence.prompt_ids(tok, None, users, answers, limit)
        text = tok.decode(ids)
        assert len(ids) <= limit and INSTRUCTION in text and text.endswith("lola? [/INST]"), (limit, text)
    # One turn: its end (the instruction, then [/INST]) stays.
    ids = adherence.prompt_ids(tok, None, [first], [], 24)
    assert len(ids) <= 24 and tok.decode(ids).endswith(INSTRUCTION + " [/INST]")


def test_prompts_count_the_turns_in_context(tok):
    users = [f"Nela lola {i}? {INSTRUCTION}" if i == 0 else f"Nela lola {i}?" for i in range(12)]
    answers = [f"Yes, lola {i}." for i in range(11)]
    ids, n = adherence.fit_prompt(tok, None, users, answers, 1000)
    assert n == 12 and len(ids) <= 1000
    ids, n = adherence.fit_prompt(tok, None, users, answers, 100)
    assert 2 <= n < 12 and len(ids) <= 100 and INSTRUCTION in tok.decode(ids)


def test_world_probes_take_the_held_out_dialogs_and_held_out_values(data):
    url = sets.eval_url(data, "dialogs")
    assert url is not None
    dialogs = sets.read(url)
    p = GattConfig()
    probes = adherence.world_probes(dialogs, ["first_word", "code"], families.values(p, heldout=True), 10, 4, 0)
    assert len(probes) == min(10, len(dialogs))
    for probe, d in zip(probes, dialogs):
        assert probe.users == [r["prompt"] for r in d[:4]]
        word = probe.instruction.text.split()[-1].rstrip(".").split(":")[0]
        assert word in p.heldout_first_words or probe.instruction.family == "code"
        assert not any(t in probe.instruction.text for t in p.first_words + p.codes)


def test_gatt_reports_world_adherence_and_control(tmp_path, data, capsys):
    gatt = sft_overrides("gatt", families="[first_word,caps]", min_turns=1, eval_turns=f"[{','.join(map(str, TURNS))}]",
                         eval_dialogs=4, eval_max_new_tokens=6, max_steps=2)
    assert cli(["gatt", *gatt, f"gatt.data={data}", f"run.root={tmp_path}", "run.id=w"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = os.path.join(str(tmp_path), "w", "gatt")
    report = storage.read_json(os.path.join(out, "report.json"))
    world = report["world"]
    assert "accuracy" in world  # finetune.fit's single-turn figures kept
    for t in TURNS:
        for arm in ("adherence", "control"):
            m = world[f"{arm}_turn_{t}"]
            for when in ("before", "after"):
                assert set(m[when]) == {"value", "ci"} and 0 <= m[when]["ci"][0] <= m[when]["ci"][1] <= 1
            assert m["n"] == 4 and 1 <= m["turns_in_context"] <= t
            assert all(1 <= v <= t for v in m["turns_in_context_detail"].values())
        gap = world[f"gap_turn_{t}"]
        assert -1 <= gap["before"]["value"] <= 1 and -1 <= gap["after"]["value"] <= 1
    assert set(summary["adherence_before"]) == {str(t) for t in TURNS}
    md = storage.read_text(os.path.join(out, "report.md"))
    assert "control" in md and "turns in context" in md
    # The "before" figures are kept with their key, which names the world's dialogs and the control.
    before = storage.read_json(os.path.join(out, "adherence_before.json"))
    assert before["key"] and before["control_by_turn"] and before["items"]
    # Every probe's instruction uses held-out values (caps has none), never a trained one.
    p = GattConfig()
    texts = {e["instruction"] for e in report["adherence_detail"]["after"]["examples"]}
    assert texts and not any(w in x for x in texts for w in p.first_words)
    assert all(x == "Answer only in capital letters." or x.split()[-1].rstrip(".") in p.heldout_first_words
               for x in texts)


def test_the_control_prompts_carry_no_instruction(tok, monkeypatch):
    seen: list[list[str]] = []

    def fake(model, tok_, dialogs, *a, **k):
        seen.extend(list(u) for _, u in dialogs)
        return [["Yes."] * len(u) for _, u in dialogs], [list(range(1, len(u) + 1)) for _, u in dialogs]

    class Model:
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

    monkeypatch.setattr(adherence, "converse_counted", fake)
    inst = families.make("first_word", __import__("random").Random(0), ["Yes"])
    probes = [adherence.Probe(inst, ["Reverse: k d w", "Sort: b a", "Copy: x y"])]
    env = type("Env", (), {"rank": 0, "world_size": 1, "device": "cpu"})()
    result = adherence.evaluate(Model(), tok, probes, [1, 3], 4, env)  # type: ignore[arg-type]
    instructed, control = seen
    assert instructed[0].endswith(inst.text) and all(inst.text not in u for u in instructed[1:])
    assert control == probes[0].users and all(inst.text not in u for u in control)
    assert result["by_turn"] == result["control_by_turn"] == {"1": 1.0, "3": 1.0}
