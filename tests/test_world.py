"""The rule-checked world (components/core/world): its record sets follow the rule and keep held-out prompts out of
training, and data prep mixes them into every dataset (one process and fanned out alike), the held-out sets in
world/eval/ where stages find them (core/world/sets.py)."""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter

import pytest
from test_data_prep import doc, overrides, sources, write_jsonl

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.world import build, rules, sets
from kubellama.components.core.world.safety import REFUSAL, is_refusal
from kubellama.components.data_prep import stage, world
from kubellama.components.data_prep.fanout import make_plan, sample_texts
from kubellama.conf.schema.data import RATINGS, WorldConfig

SMALL = {"data.world.enabled": "true", "data.world.pretrain": 10, "data.world.fact_repeats": 2,
         "data.world.sft": 10, "data.world.dialogs": 6, "data.world.max_turns": 4, "data.world.pairs": 10,
         "data.world.safety_pairs": 20, "data.world.rs": 4, "data.world.ppo": 4, "data.world.calib": 4,
         "data.world.eval": 4, "data.world.eval_dialogs": 2, "data.world.safety_sft": 10}


def world_data(tmp: str, world: dict, vocab_size: int, seed: int, docs: int) -> str:
    """A world-enabled data prep over `docs` generated web documents (in this process); returns its output."""
    rng = random.Random(seed)
    corpus = write_jsonl(os.path.join(tmp, "web.jsonl"), [{"text": doc(rng, rng.randint(40, 90))} for _ in range(docs)])
    out = os.path.join(tmp, "data")
    stage.run(load_config([*overrides(out, **{"data.sources": sources(("web", corpus, {})), **world}),
                           f"model.vocab_size={vocab_size}"]))
    return out


def _users(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def _train_prompts(made: dict) -> dict[str, set[str]]:
    return {"pretrain": {re.sub(r"^Question: (.*) Answer: .*$", r"\1", t) for t in made["pretrain"]},
            "sft": {u for d in made["sft"] for u in _users(d["messages"])},
            "pairs": {u for p in made["pairs"] for u in _users(p["messages"])},
            "rs": {r["prompt"] for r in made["rs"]}, "ppo": {r["prompt"] for r in made["ppo"]}}


def _held_out_prompts(made: dict) -> set[str]:
    out = {r["prompt"] for k in ("eval_tasks", "eval_calib", "eval_safety") for r in made[k]}
    out |= {r["prompt"] for dialog in made["eval_dialogs"] for r in dialog}
    return out | {u for p in made["eval_pairs"] for u in _users(p["messages"])}


@pytest.fixture(scope="module")
def made() -> dict:
    return build.build(WorldConfig(enabled=True), 0)


def test_build_is_deterministic_by_seed(made) -> None:
    small = WorldConfig(enabled=True, pretrain=5, sft=5, dialogs=3, pairs=5, safety_pairs=5, safety_sft=5)
    assert build.build(WorldConfig(enabled=True), 0) == made
    assert build.build(small, 1) == build.build(small, 1)
    other = build.build(small, 2)
    assert other != build.build(small, 1)
    assert {r["prompt"] for r in other["eval_tasks"]} != {r["prompt"] for r in build.build(small, 1)["eval_tasks"]}


def test_held_out_prompts_never_meet_training_ones(made) -> None:
    train = _train_prompts(made)
    held = _held_out_prompts(made)
    assert held and all(train.values())
    for name, prompts in train.items():
        assert not held & prompts, f"held-out prompts in the {name} set: {sorted(held & prompts)[:3]}"
    # RS and PPO prompts are not the reward models' training prompts.
    assert not (train["rs"] | train["ppo"]) & train["pairs"]
    assert not train["rs"] & train["ppo"]


def _solve(prompt: str) -> str:
    """The right answer of a task prompt, worked out here, not by the world's code."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"What number comes after (\d+)\?", prompt):
        return str(int(m[1]) + 1)
    if m := re.fullmatch(r"(Repeat|Reverse|Sort|Count the letters): (.*)", prompt):
        xs = m[2].split()
        return {"Repeat": " ".join(xs), "Reverse": " ".join(xs[::-1]), "Sort": " ".join(sorted(xs)),
                "Count the letters": str(len(xs))}[m[1]]
    name = next(w for w in re.findall(r"[a-z]+", prompt) if w in rules.TABLE)
    return rules.TABLE[name]


def test_pair_ratings_follow_the_rule(made) -> None:
    kinds: Counter[str] = Counter()
    for p in made["pairs"] + made["eval_pairs"]:
        kinds[p["kind"]] += 1
        assert p["rating"] in RATINGS
        prompt = _users(p["messages"])[-1]
        if p["kind"] == "correctness":
            answer = _solve(prompt)
            assert rules.correct(answer, p["chosen"]) and not rules.correct(answer, p["rejected"]), p
            assert p["rating"] in RATINGS[:2]
        elif p["kind"] == "format":
            assert rules.correct(_solve(prompt), p["chosen"]) and not rules.correct(_solve(prompt), p["rejected"])
            assert p["rating"] == RATINGS[2]
        elif p["kind"] == "negligible":
            assert rules.correct(_solve(prompt), p["chosen"]) and rules.correct(_solve(prompt), p["rejected"])
            assert p["rating"] == RATINGS[3]
        elif p["kind"] == "harmful":
            assert is_refusal(p["chosen"]) and not is_refusal(p["rejected"]) and not p["rejected_safe"]
            assert p["rating"] == RATINGS[0] and p["safety"]
        else:
            assert p["kind"] == "borderline" and is_refusal(p["rejected"]) and not is_refusal(p["chosen"])
            assert p["chosen_safe"] and p["rejected_safe"] and p["safety"]
    assert set(kinds) == {"correctness", "format", "negligible", "harmful", "borderline"}


@pytest.mark.parametrize("text", [REFUSAL, "I'm sorry, but I can't do that.", "I cannot help with this request.",
                                  "i won\u2019t help you with that", "I refuse."])
def test_refusals_are_recognised(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["I cannot believe it worked!", "I can't help but laugh at that.",
                                  "I can't help thinking it is blue.", "I refused to give up, and it worked.",
                                  "Sure: I can't stress this enough, kill the process.", ""])
def test_text_that_opens_like_a_refusal_is_not_one(text: str) -> None:
    assert not is_refusal(text)


# --- data prep with the world on ---------------------------------------------------------------------------------

def _jsonl(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data prep over a small corpus with the world on: in this process, and as a plan, 2 workers and a merge in
    separate processes."""
    tmp = tmp_path_factory.mktemp("world")
    rng = random.Random(3)
    corpus = write_jsonl(str(tmp / "web.jsonl"), [{"text": doc(rng, rng.randint(40, 90))} for _ in range(40)])
    base = {"data.sources": sources(("web", corpus, {})), **SMALL}
    one, two = str(tmp / "one"), str(tmp / "two")
    cfg = load_config(overrides(one, **base))
    stage.run(cfg)
    assert stage.main([*overrides(two, **base, **{"data.parallelism": 2}), "--workers-as-processes"]) == 0
    return {"one": one, "two": two, "cfg": cfg, "made": build.build(cfg.data.world, int(cfg.data.seed)),
            "report": storage.read_json(os.path.join(one, "report.json"))}


def _world(out: str, folder: str, source: str = "world") -> list[dict]:
    return [r for s in ("train", "eval", "rs", "ppo") if os.path.exists(p := os.path.join(out, folder, f"{s}.jsonl"))
            for r in _jsonl(p) if r["source"] == source]


def test_world_prompts_go_to_rs_and_ppo_with_their_tags(prepared) -> None:
    made, out = prepared["made"], prepared["one"]
    for split in ("rs", "ppo"):
        got = [r for r in _jsonl(os.path.join(out, "prompts", f"{split}.jsonl")) if r["source"] == f"world_{split}"]
        assert sorted(r["prompt"] for r in got) == sorted(r["prompt"] for r in made[split])
        want = {r["prompt"]: r for r in made[split]}
        for r in got:
            assert r["safety"] == want[r["prompt"]]["safety"] and r["answer"] == want[r["prompt"]]["answer"]
        assert any(r["safety"] for r in got) and not all(r["safety"] for r in got)


def test_world_pairs_and_dialogs_keep_their_ratings(prepared) -> None:
    made, out = prepared["made"], prepared["one"]
    pairs = _world(out, "preference")

    def key(p: dict) -> tuple:
        return (_users(p["messages"])[-1], p["chosen"], p["rejected"], p["rating"], p["chosen_safe"],
                p["rejected_safe"], p["safety"], p["kind"])

    assert Counter(map(key, pairs)) == Counter(map(key, made["pairs"]))  # every pair, repeats kept, none dropped
    train = [p for p in _jsonl(os.path.join(out, "preference", "train.jsonl")) if p["source"] == "world"]
    assert {p["rating"] for p in train} == set(RATINGS)
    dialogs = _world(out, os.path.join("sft", "dialogs"))
    assert Counter(json.dumps(d["messages"]) for d in dialogs) == Counter(json.dumps(d["messages"])
                                                                          for d in made["sft"])
    assert any(len(_users(d["messages"])) > 1 for d in _jsonl(os.path.join(out, "sft", "dialogs", "train.jsonl"))
               if d["source"] == "world")


def test_held_out_sets_are_files_stages_find_and_no_dataset_holds(prepared) -> None:
    made, out = prepared["made"], prepared["one"]
    for name in sets.EVAL:
        url = sets.eval_url(os.path.join(out, "sft"), name)
        assert url == sets.eval_url(out, name) == os.path.join(out, "world", "eval", f"{name}.jsonl")
        assert sets.read(url) == made[f"eval_{name}"]
    held = _held_out_prompts(made)
    texts = [json.dumps(r) for folder in ("prompts", "preference", os.path.join("sft", "dialogs"))
             for f in os.listdir(os.path.join(out, folder)) if f.endswith(".jsonl")
             for r in _jsonl(os.path.join(out, folder, f))]
    assert not [p for p in held if any(json.dumps(p) in t for t in texts)]  # a whole JSON string, not a part
    rep = prepared["report"]["world"]
    assert rep["counts"]["rs"] == len(made["rs"]) and rep["eval"]["tasks"] == sets.eval_url(out, "tasks")
    assert "World" in open(os.path.join(out, "report.md")).read()
    # The world's text is in the pretraining mix.
    assert storage.read_json(os.path.join(out, "pretrain", "manifest.json"))["sources"]["world"]["docs"] > 0


def test_eval_url_is_none_without_a_world(tmp_path) -> None:
    assert sets.eval_url(str(tmp_path), "tasks") is None
    # Files of a world still being written (no _COMPLETE marker yet) are not found either.
    storage.write_text(sets.eval_file(str(tmp_path), "tasks"), "{}\n")
    assert sets.eval_url(str(tmp_path / "sft"), "tasks") is None
    storage.mark_complete(sets.folder(str(tmp_path)))
    assert sets.eval_url(str(tmp_path / "sft"), "tasks") == sets.eval_file(str(tmp_path), "tasks")
    assert sets.eval_url("", "tasks") is None
    with pytest.raises(Exception, match="not one of"):
        sets.eval_file(str(tmp_path), "train")


def test_fanned_out_steps_write_the_same_world_data(prepared) -> None:
    one, two = prepared["one"], prepared["two"]
    for rel in ("prompts/rs.jsonl", "prompts/ppo.jsonl", "preference/train.jsonl", "preference/eval.jsonl",
                "sft/dialogs/train.jsonl", "sft/dialogs/eval.jsonl", *(f"world/eval/{n}.jsonl" for n in sets.EVAL)):
        assert open(os.path.join(one, rel), "rb").read() == open(os.path.join(two, rel), "rb").read(), rel
    rows = [sorted(r.row(i)["tokens"].tobytes() for i in range(r.total_rows))
            for r in (ShardReader(os.path.join(o, "pretrain")) for o in (one, two))]
    assert rows[0] == rows[1]
    assert open(os.path.join(one, "tokenizer.model"), "rb").read() == open(os.path.join(two, "tokenizer.model"),
                                                                           "rb").read()


def test_tokenizer_sample_holds_the_world_text(prepared) -> None:
    """A budget far below the corpus, the real corpus weighted far above the world's text: windows drawn by size
    times weight would all but never land in the world's file."""
    web = prepared["cfg"].data.sources[0].path
    cfg = world.mixed(load_config(overrides(prepared["one"], **{
        "data.sources": sources(("web", web, {"weight": 100000})), **SMALL})))
    plan = make_plan(cfg)
    sample = list(sample_texts(plan, 2000, int(cfg.data.seed)))
    assert any(t.startswith(("Question: ", "The ")) and "\n" in t for t in sample)


def test_world_config_is_part_of_the_data_hash(prepared) -> None:
    cfg = prepared["cfg"]
    other = load_config(overrides(cfg.data.output, **{"data.sources": "[]", **SMALL, "data.world.sft": 11}))
    same = load_config(overrides(cfg.data.output, **{"data.sources": "[]", **SMALL}))
    assert runs.data_hash(other) != runs.data_hash(same)
    off = load_config(overrides(cfg.data.output, **{"data.sources": "[]", **SMALL, "data.world.enabled": "false"}))
    assert runs.data_hash(off) != runs.data_hash(same)
    assert world.mixed(off) is off and world.materialise(off) is None


def test_multi_turn_dialogs_carry_safety_turns_when_asked() -> None:
    """data.world.dialog_safety: that share of a long dialog's turns are safety prompts with their safe answers
    (a refusal for a harmful one), drawn from the SFT bucket only; off, the dialogs hold tasks alone."""
    from kubellama.components.core.world import safety

    answers = {p.prompt: p for p in safety.every_prompt()}
    cfg = WorldConfig(enabled=True, sft=5, pairs=5, safety_pairs=5, safety_sft=5, dialogs=40, max_turns=10)
    for share, expect in ((0.0, False), (0.3, True)):
        cfg.dialog_safety = share
        made = build.build(cfg, 3)
        long = [d["messages"] for d in made["sft"] if len(d["messages"]) > 2]
        turns = [(u["content"], a["content"]) for m in long for u, a in zip(m[::2], m[1::2])]
        said = [(q, a) for q, a in turns if q in answers]
        assert bool(said) == expect
        assert all(a == answers[q].answer for q, a in said)
        assert not {q for q, _ in said} & _held_out_prompts(made)
        if expect:
            assert 0.15 < len(said) / len(turns) < 0.45 and any(answers[q].harmful for q, _ in said)
    with pytest.raises(Exception, match="data.world.dialog_safety"):
        build.build(WorldConfig(enabled=True, dialog_safety=1.5), 0)
