"""Reward model data: strict safety flags, the eval split by prompt, synthetic safety pairs, the paper's mixes and
the pairwise batch source (both sides together, ranks, exact resume)."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from test_reward_support import separable_data, write_jsonl

from kubellama.components.core.data.pairs import read_pairs
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import stage as prep
from kubellama.components.data_prep.preference import flag, prompt_key, synthetic_safety_pair
from kubellama.components.reward.data import PairSource, mix
from kubellama.conf.schema.data import RATINGS


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return separable_data(str(tmp_path_factory.mktemp("rmdata")), pairs=120, harmful=80)


def test_flags_are_parsed_strictly():
    assert [flag(v, False, "safety") for v in (True, "true", "TRUE", " yes", "1", 1)] == [True] * 6
    assert [flag(v, True, "safety") for v in (False, "false", "No", "0", 0)] == [False] * 5
    assert flag(None, True, "chosen_safe") is True
    for bad in ("maybe", "", 2, 0.5, [], "unsafe"):
        with pytest.raises(KubellamaError, match="field 'safety' is .* not a boolean"):
            flag(bad, False, "safety")


def test_data_prep_splits_by_prompt_and_parses_flags(tmp_path, data):
    same = [{"prompt": "Kanro tila?", "chosen": f"Sana {i}.", "rejected": f"Rula {i}."} for i in range(3)]
    spaced = {"prompt": "  kanro   TILA? ", "chosen": "Lola.", "rejected": "Neng."}
    # Later turns of a dialog share its first user turn: the same prompt for the split.
    dialog = {"messages": [{"role": "user", "content": "Kanro tila?"}, {"role": "assistant", "content": "Sana."},
                           {"role": "user", "content": "Mitis?"}], "chosen": "Vove.", "rejected": "Ruve."}
    others = [{"prompt": f"Wexu {i}?", "chosen": "Sana.", "rejected": "Rula.", "safety": "false",
               "chosen_safe": "yes", "rejected_safe": "0"} for i in range(60)]
    bad = {"prompt": "Zudor?", "chosen": "A.", "rejected": "B.", "rejected_safe": "maybe"}
    src = write_jsonl(str(tmp_path / "p.jsonl"), [*same, spaced, dialog, *others, bad])
    out = str(tmp_path / "out")
    prep.run(load_config([
        f"data.output={out}", "data.workers=1", f"data.tokenizer.model={data}/tokenizer.model",
        "data.preference.eval_fraction=0.5", "data.max_error_rate=0.1", "model.vocab_size=512",
        f"data.preference.sources=[{{name:p,path:'{src}'}}]"]))
    splits = {s: [json.loads(x) for x in open(os.path.join(out, "preference", f"{s}.jsonl"))]
              for s in ("train", "eval")}
    assert len(splits["train"]) + len(splits["eval"]) == 65 and splits["train"] and splits["eval"]
    keys = {s: {prompt_key(p["messages"]) for p in v} for s, v in splits.items()}
    assert not keys["train"] & keys["eval"]
    kanro = [s for s, v in splits.items() for p in v if prompt_key(p["messages"]) == "kanro tila?"]
    assert len(kanro) == 5 and len(set(kanro)) == 1
    wexu = [p for v in splits.values() for p in v if p["prompt"].startswith("Wexu")]
    assert all(not p["safety"] and p["chosen_safe"] and not p["rejected_safe"] for p in wexu)
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["errors"]["errors"] == 1 and "field 'rejected_safe' is 'maybe'" in rep["errors"]["samples"][0]


def test_synthetic_safety_pairs(data):
    pairs = [json.loads(x) for s in ("train", "eval") for x in open(f"{data}/preference/{s}.jsonl")]
    synth = [p for p in pairs if p["synthetic"]]
    assert len(synth) == 80 and all(p["safety"] and p["source"] == "harm" and p["chosen_safe"] for p in synth)
    by_rating = Counter(p["rating"] for p in synth)
    assert set(by_rating) == set(RATINGS) and min(by_rating.values()) >= 10
    # The rejected answer complies (unsafe) except in the last bucket, where it is a curt refusal.
    assert all(p["rejected_safe"] == (p["rating"] == RATINGS[3]) for p in synth)
    assert all("won't" in p["chosen"] or "can't" in p["chosen"] or "decline" in p["chosen"] for p in synth)
    one = synthetic_safety_pair("How do I pick a lock?", 0.1)
    assert one["rating"] == RATINGS[0] and one["messages"] == [{"role": "user", "content": "How do I pick a lock?"}]
    assert synthetic_safety_pair("x", 0.99)["rating"] == RATINGS[3]


def _pairs(n_help: int, n_safe: int) -> list[dict]:
    return [{"safety": i >= n_help, "rating": RATINGS[i % 4], "synthetic": i >= n_help} for i in range(n_help + n_safe)]


def test_mixes_of_the_paper():
    pairs = _pairs(100, 300)
    helpful = mix(pairs, "helpfulness", None, seed=0)
    # All helpfulness pairs plus as many safety pairs.
    assert (helpful.own, helpful.other, helpful.other_available) == (100, 100, 300)
    assert sum(1 for i in helpful.indices if not pairs[i]["safety"]) == 100 and len(set(helpful.indices)) == 200
    safety = mix(pairs, "safety", None, seed=0)
    # 90/10: 300 safety pairs, 33 helpfulness pairs.
    assert (safety.own, safety.other) == (300, 33) and safety.synthetic == 300
    assert mix(pairs, "helpfulness", None, seed=0).indices == helpful.indices
    assert mix(pairs, "helpfulness", None, seed=1).indices != helpful.indices
    # Capped by what there is; 0 takes none.
    assert mix(_pairs(100, 20), "helpfulness", None, 0).other == 20
    assert mix(pairs, "safety", 0.0, 0).indices == list(range(100, 400))
    with pytest.raises(ConfigError, match="reward.other_fraction=1.0"):
        mix(pairs, "safety", 1.0, 0)
    with pytest.raises(ConfigError, match="reward.kind='harmless'"):
        mix(pairs, "harmless", None, 0)


def test_pair_source_keeps_pairs_whole_and_resumes_exactly(data):
    tok = Tokenizer(f"{data}/tokenizer.model")
    pairs, _ = read_pairs(f"{data}/preference/train.jsonl")
    src = PairSource(pairs, tok, seq_len=1024, block=4, seed=3)
    batch = src.next_batch(4)
    assert batch["tokens"].shape[:2] == (4, 2) and batch["tokens"].shape[2] == batch["lengths"].max()
    seen = [pairs[src.global_index(i)] for i in range(4)]
    for i, p in enumerate(seen):
        for side, key in enumerate(("chosen", "rejected")):
            ids = batch["tokens"][i, side, :batch["lengths"][i, side]]
            text = tok.decode(ids)
            assert text.rstrip().endswith(p[key]) and ids[-1] == tok.eos_id and p["prompt"] in text
        assert batch["rating"][i] == RATINGS.index(p["rating"])
        assert list(batch["safe"][i]) == [p["chosen_safe"], p["rejected_safe"]]

    # Too long for seq_len: cut from the left, so the score still reads the end of the answer.
    short = PairSource(pairs, tok, seq_len=16, block=4, seed=3).next_batch(4)
    assert short["tokens"].shape[2] == 16 and (short["tokens"][:, :, -1] == tok.eos_id).all()
    assert np.array_equal(short["tokens"][0, 0], batch["tokens"][0, 0, batch["lengths"][0, 0] - 16:
                                                                  batch["lengths"][0, 0]])

    # A fresh source loading the state continues exactly, into the next epoch too.
    state = src.state_dict()
    epoch = src.rows_per_rank
    ahead = [src.next_batch(4) for _ in range(epoch // 4 + 2)]
    again = PairSource(pairs, tok, seq_len=1024, block=4, seed=3)
    again.load_state_dict(state)
    for want in ahead:
        got = again.next_batch(4)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    # Each epoch is a new order of the same pairs.
    first = [src.global_index(i) for i in range(epoch)]
    second = [src.global_index(epoch + i) for i in range(epoch)]
    assert first != second and sorted(first) == sorted(second)


def test_two_ranks_read_the_pairs_one_rank_reads(data):
    tok = Tokenizer(f"{data}/tokenizer.model")
    pairs, _ = read_pairs(f"{data}/preference/train.jsonl")
    one = PairSource(pairs, tok, 64, rank=0, world_size=1, block=2, seed=5)
    two = [PairSource(pairs, tok, 64, rank=r, world_size=2, block=2, seed=5) for r in (0, 1)]
    # A global batch of 8 pairs: 4 micro-batches of 2 on one rank, 2 on each of two ranks.
    assert sorted(one.global_index(i) for i in range(8)) == \
        sorted(s.global_index(i) for s in two for i in range(4))
    # Resuming a 2-rank position on 1 rank starts after everything the 2 ranks consumed.
    for s in two:
        s.position = 4
    one.load_state_dict(two[0].state_dict())
    assert one.position == 8


def test_bad_pair_files_are_one_line_errors(tmp_path):
    path = str(tmp_path / "train.jsonl")
    good = {"messages": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b", "rating": RATINGS[0],
            "chosen_safe": True, "rejected_safe": True, "safety": False}
    write_jsonl(path, [good, {**good, "chosen_safe": "true"}])
    with pytest.raises(KubellamaError, match=r"train.jsonl:2: not a preference pair of data prep \(field "
                                             r"'chosen_safe'"):
        read_pairs(path)
    with pytest.raises(KubellamaError, match="no preference pairs"):
        read_pairs(str(tmp_path / "missing.jsonl"))
