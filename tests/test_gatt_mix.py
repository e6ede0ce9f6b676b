"""GAtt's set options for small models: `gatt.train_turns=all` puts the loss on every answer of an instructed dialog
(the instruction still in the first user turn only), and `gatt.plain_share` mixes in plain dialogs, trained as SFT
trains them, with no instruction anywhere."""
from __future__ import annotations

import json
import os

import pytest
from test_sft_support import make_data

from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.gatt import stage
from kubellama.components.gatt.data import PLAIN, Dialog, assign, build, example, plain
from kubellama.conf.schema import Config


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    data = make_data(str(tmp_path_factory.mktemp("gatt_mix")), dialogs=20, turns=2)
    return Tokenizer(os.path.join(data, "tokenizer.model"))


def _trained_spans(labels: list[int]) -> int:
    """How many separate runs of trained labels (one per trained answer)."""
    return sum(1 for i, x in enumerate(labels) if x != IGNORE and (i == 0 or labels[i - 1] == IGNORE))


def _dialog() -> Dialog:
    return Dialog(None, ["Repeat: a b", "Sort: c a", "Repeat: d"], ["a b", "a c", "d"])


def test_all_turns_trains_every_answer_with_the_instruction_in_the_first_turn_only(tok):
    d = assign([_dialog()], ["caps"], [], seed=0)[0]
    msgs, (_, labels, _) = example(d, tok, 256, enforce=True, last_only=False)
    assert _trained_spans(labels) == 3
    users = [m["content"] for m in msgs if m["role"] == "user"]
    assert users[0].endswith("Answer only in capital letters.") and not any("capital" in u for u in users[1:])
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["A B", "A C", "D"]
    # The paper's default: only the last answer carries the loss.
    _, (_, last, _) = example(d, tok, 256, enforce=True, last_only=True)
    assert _trained_spans(last) == 1


def test_plain_dialogs_train_every_answer_untouched_and_are_counted_apart(tmp_path, tok):
    instructed = assign([_dialog() for _ in range(3)], ["caps"], [], seed=0)
    pool = [_dialog(), Dialog(None, ["Count the letters: a b"], ["2"])]
    extra = plain(pool, len(instructed), 0.5, seed=1)
    assert len(extra) == 3 and all(d.instruction is None for d in extra)
    # Half of them as long as an instructed dialog (the contrast), half from every dialog.
    assert sum(len(d.answers) >= 2 for d in plain(pool, 10, 0.5, seed=2)) >= 5
    msgs, (_, labels, _) = example(extra[0], tok, 256, enforce=True, last_only=True)
    assert _trained_spans(labels) == len(extra[0].answers)
    assert not any("capital" in m["content"] for m in msgs)
    stats = build(str(tmp_path / "set"), {"train": instructed + extra}, tok, 256, enforce=True)
    assert stats["train"]["families"] == {"caps": 3, PLAIN: 3}
    records = [json.loads(x) for x in storage.read_text(str(tmp_path / "set" / "train.jsonl")).splitlines()]
    assert [r["instruction"] is None for r in records] == [False] * 3 + [True] * 3
    # No share, no plain dialogs; a share of 1 or more is a config error naming the key.
    assert plain([_dialog()], 3, 0.0, seed=1) == []
    cfg = Config()
    cfg.gatt.plain_share = 1.0
    with pytest.raises(ConfigError, match="gatt.plain_share"):
        stage._check(cfg)
    cfg.gatt.plain_share, cfg.gatt.train_turns = 0.3, "first"
    with pytest.raises(ConfigError, match="gatt.train_turns='first'"):
        stage._check(cfg)
