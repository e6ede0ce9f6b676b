"""Issue 21, defect 2: GAtt's default data must not teach the model to ignore the instruction. With
`gatt.answers=given` every trained answer obeys its instruction, held-out values stay out of training, and a family
no function can enforce is a one-line config error there."""
from __future__ import annotations

import json
import os
import random

import pytest
from test_sft_support import make_data

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.gatt import families
from kubellama.components.gatt.data import Dialog, assign, build, read_dialogs
from kubellama.conf.schema.gatt import GattConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_data(str(tmp_path_factory.mktemp("gatt_defects")), dialogs=60, turns=2)


def test_every_trained_answer_of_the_default_families_obeys_its_instruction(tmp_path, data):
    """Fails before the fix: the default `language` family trained "Always answer in Italian." on the given,
    untouched English answer (no check, no enforce)."""
    p = GattConfig()
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    dialogs = read_dialogs(os.path.join(data, "sft", "dialogs", "train.jsonl"), min_turns=1)
    dialogs.append(Dialog(None, ["Is snow cold?", "Why?"], ["Snow is frozen water.", "It melts above zero."]))
    assign(dialogs, p.families, p.first_words, seed=0)
    assert {d.instruction.family for d in dialogs} == set(p.families)  # type: ignore[union-attr]
    build(str(tmp_path / "set"), {"train": dialogs, "eval": []}, tok, 512, enforce=p.answers == "given")
    records = [json.loads(x) for x in storage.read_text(str(tmp_path / "set" / "train.jsonl")).splitlines()]
    assert len(records) == len(dialogs)
    for d, rec in zip(dialogs, records):
        inst = d.instruction
        assert inst is not None and rec["instruction"] == inst.text
        assert inst.check is not None, f"{inst.family}: no function checks '{inst.text}'"
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        assert all(inst.check(a) for a in answers), (inst.text, answers)


def test_end_word_and_code_families_check_and_enforce():
    rng = random.Random(0)
    end = families.make("end_word", rng, {"end_word": ["Amen"]})
    assert end.text == "End every answer with the word Amen."
    assert end.check("Fine, amen!") and not end.check("Amen, fine.") and end.check(end.enforce("Snow is cold."))
    code = families.make("code", rng, {"code": ["zo"]})
    assert code.check("Snowzo iszo coldzo.") and not code.check("Snow is cold.") and not code.check("")
    assert code.enforce("Snow is cold, 2 C.") == "Snowzo iszo coldzo, 2zo Czo." and code.check(code.enforce("Hi."))
    # A plain list still gives the first words (how the stage and eval call it).
    assert families.make("first_word", rng, ["Sure"]).text == "Begin every answer with the word Sure."


def test_held_out_values_are_new_and_never_trained():
    p = GattConfig()
    train, held = families.values(p), families.values(p, heldout=True)
    for f in ("first_word", "end_word", "code"):
        assert train[f] and held[f] and not {v.lower() for v in train[f]} & {v.lower() for v in held[f]}
    rng = random.Random(0)
    trained = {families.make(f, rng, train).text for f in families.ENFORCEABLE for _ in range(50)}
    probed = {families.make(f, rng, held).text for f in families.ENFORCEABLE if f != "caps" for _ in range(50)}
    assert not trained & probed
    with pytest.raises(ConfigError, match=r"gatt.heldout_end_words.*gatt.end_words.*'amen'"):
        families.validate_config(GattConfig(end_words=["Amen", "Done"], heldout_end_words=["amen"]))


@pytest.mark.parametrize("family", ["hobby", "language", "figure", "combo"])
def test_a_family_without_enforce_is_a_config_error_with_given_answers(family):
    with pytest.raises(ConfigError, match=rf"gatt.families.*'{family}'.*gatt.answers=given") as err:
        families.validate_config(GattConfig(families=["caps", family], answers="given"))
    assert "\n" not in str(err.value)
    # Sampled answers may still carry it (dialogs failing a checkable instruction are dropped).
    assert families.validate_config(GattConfig(families=["caps", family], answers="sample")) == ["caps", family]
    # The set builder refuses it too, whoever calls it.
    d = Dialog(None, ["Hi?"], ["Hello."])
    assign([d], [family], [], seed=0)
    with pytest.raises(ConfigError, match="gatt.answers=given"):
        build("/nonexistent/never-written", {"train": [d]}, None, 64, enforce=True)  # type: ignore[arg-type]


def test_an_answer_no_rule_can_make_comply_is_left_out(tmp_path, data):
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    dialogs = [Dialog(None, ["How much?"], ["42."]), Dialog(None, ["Is snow cold?"], ["Snow is cold."])]
    assign(dialogs, ["caps"], [], seed=0)
    stats = build(str(tmp_path / "set"), {"train": dialogs}, tok, 128, enforce=True)
    assert stats["train"]["examples"] == 1 and stats["train"]["disobeyed"] == 1
