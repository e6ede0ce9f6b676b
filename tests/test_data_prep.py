"""The data prep stage end to end on corpora these tests write: cleaning counts, shards, SFT labels, S3, bad input."""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubellama.components.core.data.readers import ErrorLog
from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.data.tokenizer import IGNORE, Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import load_config
from kubellama.components.data_prep import datasets, pack, stage
from kubellama.components.data_prep.clean import luhn

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "we", "zu", "bra", "cle")
         for b in ("n", "ro", "tis", "mek", "la", "dor", "ve", "xu", "pa", "ng")] + ["the", "and", "über", "café"]


def doc(rng: random.Random, words: int = 80) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 14))
        sentences.append(" ".join(rng.choice(VOCAB) for _ in range(n)).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def overrides(out: str, **extra: object) -> list[str]:
    base = {"data.output": out, "data.workers": 1, "data.seq_len": 64, "data.tokenizer.vocab_size": 400,
            "data.max_error_rate": 0.0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def sources(*items: tuple[str, str, dict]) -> str:
    parts = []
    for name, path, more in items:
        fields = [f"name:{name}", f"path:'{path}'"] + [f"{k}:{v}" for k, v in more.items()]
        parts.append("{" + ",".join(fields) + "}")
    return "[" + ",".join(parts) + "]"


PII_DOC = ("Meet at Cafe\u0301 Rouge. Write to jane.doe@example.com or call +1 415-555-0134 today; the server at 192.168.10.20 logs "
           "card 4111 1111 1111 1111 but order 1234 5678 9012 3456 is no card. ")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A corpus with planted duplicates, near-duplicates, PII, junk and malformed lines; the stage run on it."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = random.Random(7)
    docs = [doc(rng, rng.randint(60, 120)) for _ in range(60)]
    near = docs[5].split(" ")
    near[40] = "zuzuzu"
    # Similar but not a near duplicate: every third word replaced (estimated Jaccard far below 0.8).
    apart = [w if i % 3 else "zuzuzu" for i, w in enumerate(docs[7].split(" "))]
    web = docs + [
        docs[3], docs[3],                                   # 2 exact duplicates
        " ".join(near),                                      # near duplicate: one word changed
        docs[6].upper(),                                     # near duplicate: case only (shingles are lower-cased)
        " ".join(apart),                                     # kept
        PII_DOC + doc(rng, 40),
        "hi",                                                # too_short
        "1234 5678 ## 99 %% 42 == 17 -- 88 ++ 1000 ** 2 // 555 ## 77 $$ 12",  # low_alpha
        "\n".join(["Buy now, best price!"] * 8),            # repetitive
    ]
    recs: list = [{"text": t} for t in web]
    recs.insert(10, "{not json")
    recs.insert(20, {"body": "no text field"})
    web_path = write_jsonl(str(tmp / "web.jsonl"), recs)
    wiki_path = str(tmp / "wiki.txt")
    wiki = [doc(rng, 100) for _ in range(20)]
    with open(wiki_path, "w", encoding="utf-8") as f:
        f.write("\n".join(wiki) + "\n")
    out = str(tmp / "out")
    over = overrides(out, **{"data.max_error_rate": 0.05, "data.sources": sources(
        ("web", web_path, {}), ("wiki", wiki_path, {"weight": 2.0}))})
    cfg = load_config(over)
    summary = stage.run(cfg)
    return {"out": out, "summary": summary, "web": web_path, "docs": docs, "wiki": wiki, "overrides": over,
            "report": storage.read_json(os.path.join(out, "report.json"))}


def test_planted_duplicates_and_junk_are_counted(planted) -> None:
    rep = planted["report"]
    assert rep["clean"]["dropped"] == {"dup_exact": 2, "dup_near": 2, "too_short": 1, "low_alpha": 1,
                                       "repetitive": 1, "too_long": 0}
    web, wiki = rep["sources"]
    assert web["docs_in"] == 60 + 9 and web["docs"] == 62
    assert wiki["docs"] == 20 and wiki["dropped"] == {}


def test_pii_is_scrubbed_and_counted(planted) -> None:
    assert not luhn("1234567890123456") and luhn("4111111111111111")
    assert planted["report"]["clean"]["pii"] == {"email": 1, "phone": 1, "ip": 1, "card": 1}
    tok = Tokenizer(os.path.join(planted["out"], "tokenizer.model"))
    reader = ShardReader(os.path.join(planted["out"], "pretrain"))
    text = tok.decode(np.concatenate([reader.row(i)["tokens"] for i in range(reader.total_rows)]))
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IP_ADDRESS>" in text and "<CARD_NUMBER>" in text
    for secret in ("jane.doe@example.com", "415-555-0134", "192.168.10.20", "4111 1111 1111 1111"):
        assert secret not in text
    assert "1234 5678 9012 3456" in text
    assert "Caf\u00e9 Rouge" in text and "Cafe\u0301" not in text  # NFC


def test_bad_lines_are_reported_with_file_and_line(planted) -> None:
    errors = planted["report"]["errors"]
    assert errors["errors"] == 2
    assert errors["by_reason"] == {"malformed JSON": 1, "missing or non-string field 'text'": 1}
    assert any(s.startswith(f"{planted['web']}:11: malformed JSON") for s in errors["samples"])
    assert any(s.startswith(f"{planted['web']}:21: missing") for s in errors["samples"])
    assert "web.jsonl:11" in storage.read_text(os.path.join(planted["out"], "report.md"))


def test_report_carries_the_lineage_of_a_training_stage(planted) -> None:
    from kubellama.components.core.recipe import runs
    from kubellama.components.core.recipe.config import load_config as load

    lineage = planted["report"]["lineage"]
    manifest = storage.read_json(os.path.join(planted["out"], "pretrain", "manifest.json"))
    assert lineage["data_hash"] == runs.manifest_hash(manifest) and lineage["parent"] is None
    assert lineage["config_hash"] == runs.data_hash(load(planted["overrides"]))
    assert lineage["data_hash"] in storage.read_text(os.path.join(planted["out"], "report.md"))


def test_weights_upsample_and_everything_is_published(planted) -> None:
    out = planted["out"]
    manifest = storage.read_json(os.path.join(out, "pretrain", "manifest.json"))
    assert manifest["sources"]["wiki"]["docs"] == 40 and manifest["sources"]["web"]["docs"] == 62
    assert manifest["tokenizer_sha256"] == planted["report"]["tokenizer"]["sha256"]
    assert manifest["documents"] == 102
    assert storage.is_complete(out) and storage.is_complete(os.path.join(out, "pretrain"))
    sha = storage.read_text(os.path.join(out, "tokenizer.sha256")).split()[0]
    assert sha == Tokenizer(os.path.join(out, "tokenizer.model")).sha256
    assert planted["summary"]["pretrain_tokens"] == manifest["tokens"] > 0


def test_shards_read_back_equal_the_token_stream(tmp_path) -> None:
    rng = random.Random(1)
    docs = [doc(rng, rng.randint(20, 90)) for _ in range(120)]
    path = write_jsonl(str(tmp_path / "c.jsonl"), [{"content": d} for d in docs])
    out = str(tmp_path / "out")
    # Two workers: the order-preserving parallel path must give the sequential stream.
    stage.run(load_config(overrides(out, **{"data.workers": 2, "data.shard_tokens": 64 * 50, "data.sources": sources(
        ("c", path, {"text_field": "content"}))})))
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    stream = np.array([t for d in docs for t in tok.encode(d, bos=True, eos=True)])
    reader = ShardReader(os.path.join(out, "pretrain"))
    rows = len(stream) // 64
    assert reader.total_rows == rows and len(reader.manifest["shards"]) == -(-rows // 50)
    got = np.stack([reader.row(i)["tokens"] for i in range(rows)])
    assert np.array_equal(got.ravel(), stream[:rows * 64])
    assert reader.manifest["dropped_tail_tokens"] == len(stream) - rows * 64
    # Two ranks: disjoint slices that together cover every row (the odd last row, if any, is left out by design).
    seen = []
    for rank in (0, 1):
        r = ShardReader(os.path.join(out, "pretrain"), rank=rank, world_size=2)
        seen.append({r.global_index(p) for p in range(r.rows_per_rank)})
        batch = r.next_batch(3)["tokens"]
        assert np.array_equal(batch, got[[rank, rank + 2, rank + 4]])
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(rows - rows % 2))


def test_sft_labels_are_ignore_exactly_off_the_answers(tmp_path) -> None:
    rng = random.Random(2)
    answers = [doc(rng, 5), doc(rng, 6), doc(rng, 4)]
    multi = {"messages": [{"role": "system", "content": "Answer in the kanro tongue."},
                          {"role": "user", "content": "Mitis lola?"}, {"role": "assistant", "content": answers[0]},
                          {"role": "user", "content": "Wexu nedor?"}, {"role": "assistant", "content": answers[1]},
                          {"role": "user", "content": "Clela?"}, {"role": "assistant", "content": answers[2]}]}
    alpaca = {"instruction": "Rumek the sapa.", "input": "Vove tila", "output": "Sang zun."}
    sharegpt = {"conversations": [{"from": "human", "value": "Kaxu?"}, {"from": "gpt", "value": "Tidor."}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    sft = write_jsonl(str(tmp_path / "sft.jsonl"), [multi, alpaca, sharegpt, bad])
    text = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": doc(rng, 80)} for _ in range(40)])
    out = str(tmp_path / "out")
    summary = stage.run(load_config(overrides(out, **{
        "data.seq_len": 256, "data.max_error_rate": 0.5, "data.sources": sources(("t", text, {})),
        "data.sft.sources": sources(("chat", sft, {})), "data.sft.eval_fraction": 0})))
    assert summary["sft_examples"] == 3 and summary["input_errors"] == 1
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    reader = ShardReader(os.path.join(out, "sft", "train"))
    rows = [reader.row(i) for i in range(reader.total_rows)]
    tokens = np.concatenate([r["tokens"] for r in rows])
    labels = np.concatenate([r["labels"] for r in rows])
    segs = np.concatenate([r["segments"] for r in rows])
    assert sorted(set(segs.tolist()) - {-1}) == [0, 1, 2]
    assert np.all(labels[segs == -1] == IGNORE)
    # Example 0, the multi-turn one: trained tokens are exactly the three answers (each with its EOS).
    ids, labs = tokens[segs == 0].tolist(), labels[segs == 0].tolist()
    runs: list[list] = []
    for t, lab in zip(ids, labs):
        trained = lab != IGNORE
        assert not trained or lab == t
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append([trained, [t]])
    assert [r[0] for r in runs] == [False, True] * 3
    assert [tok.decode(r[1]).strip() for r in runs if r[0]] == answers
    assert all(r[1][-1] == tok.eos_id for r in runs if r[0])
    assert [tok.decode(r[1]) for r in runs if not r[0]] == [
        "[INST] <<SYS>>\nAnswer in the kanro tongue.\n<</SYS>>\n\nMitis lola? [/INST]", "[INST] Wexu nedor? [/INST]",
        "[INST] Clela? [/INST]"]
    alp = tokens[segs == 1]
    assert tok.decode(alp[labels[segs == 1] == IGNORE]) == "[INST] Rumek the sapa.\n\nVove tila [/INST]"


def test_preference_pairs_and_prompts(tmp_path) -> None:
    pairs = [
        {"prompt": "Kanro?", "chosen": "Sana.", "rejected": "Rula.", "rating": "better", "chosen_safe": True,
         "rejected_safe": False},
        {"prompt": "Unsafe?", "chosen": "Bad.", "rejected": "Refuse.", "chosen_safe": False, "rejected_safe": True},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: Kanro ka.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No."},
        {"prompt": [{"role": "user", "content": "Trl?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"conversations": [{"from": "human", "value": "Gpt?"}], "chosen": {"from": "gpt", "value": "A."},
         "rejected": {"from": "gpt", "value": "B."}},
        {"prompt": "Missing rejected", "chosen": "x"},
    ]
    pref = write_jsonl(str(tmp_path / "pref.jsonl"), pairs)
    helpful = write_jsonl(str(tmp_path / "help.jsonl"), [{"instruction": f"Task {i}"} for i in range(40)] +
                          [{"instruction": "Task 0"}])
    harmful = str(tmp_path / "harm.prompt")
    with open(harmful, "w") as f:
        f.write("dataset_name: x\nseeds:\n- value: Do harm one\n  data_type: text\n- value: Do harm two\n")
    model = _tiny_model(tmp_path)
    out = str(tmp_path / "out")
    stage.run(load_config(overrides(out, **{
        "data.max_error_rate": 0.1, "data.tokenizer.model": model, "data.preference.eval_fraction": 0.0,
        "data.preference.sources": sources(("p", pref, {"rating": "'slightly better'"})),
        "data.prompts.sources": sources(("help", helpful, {"text_field": "instruction"}),
                                        ("harm", harmful, {"safety": "true", "split": "eval"}))})))
    got = [json.loads(x) for x in open(os.path.join(out, "preference", "train.jsonl"))]
    assert [g["prompt"] for g in got] == ["Kanro?", "Joke?", "Trl?", "Gpt?"]
    assert [g["rating"] for g in got] == ["better"] + ["slightly better"] * 3
    assert got[1]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                  {"role": "user", "content": "Joke?"}]
    assert (got[1]["chosen"], got[1]["rejected"]) == ("Kanro ka.", "No.")
    assert (got[0]["chosen_safe"], got[0]["rejected_safe"]) == (True, False)
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["preference"]["dropped_unsafe_chosen"] == 1
    assert rep["errors"]["errors"] == 1 and "pref.jsonl:6" in rep["errors"]["samples"][0]
    prompts = {s: [json.loads(x) for x in open(os.path.join(out, "prompts", f"{s}.jsonl"))]
               for s in ("rs", "ppo", "eval")}
    assert sum(len(v) for v in prompts.values()) == 42 and rep["prompts"]["duplicates"] == 1
    harm = [p for p in prompts["eval"] if p["source"] == "harm"]
    assert [p["prompt"] for p in harm] == ["Do harm one", "Do harm two"] and all(p["safety"] for p in harm)
    assert not any(p["safety"] for s in ("rs", "ppo") for p in prompts[s])
    assert prompts["rs"] and prompts["ppo"]


def _tiny_model(tmp_path) -> str:
    from kubellama.components.data_prep.pack import train_tokenizer

    rng = random.Random(5)
    path = str(tmp_path / "given.model")
    with open(path, "wb") as f:
        f.write(train_tokenizer([doc(rng, 60) for _ in range(50)], vocab_size=300))
    return path


def test_prompt_safety_flags_are_parsed_strictly(tmp_path) -> None:
    # preference.flag, as for preference pairs: bool("false") would be True; a value that is no boolean is a bad
    # record, not the source's default.
    values = ["false", "true", "yes", "No", 0, 1, False, None, "maybe", 2]
    recs = [{"prompt": f"Ask {i}", **({} if v is None else {"safety": v})} for i, v in enumerate(values)]
    path = write_jsonl(str(tmp_path / "p.jsonl"), recs)
    cfg = load_config(overrides(str(tmp_path / "out"), **{
        "data.prompts.sources": sources(("s", path, {"safety": "true", "split": "eval"}))}))
    errors = ErrorLog()
    datasets.build_prompts(cfg, errors)
    got = {r["prompt"]: r["safety"] for r in map(json.loads, open(tmp_path / "out" / "prompts" / "eval.jsonl"))}
    # Absent (Ask 7): the source's safety=true.
    assert got == {"Ask 0": False, "Ask 1": True, "Ask 2": True, "Ask 3": False, "Ask 4": False, "Ask 5": True,
                   "Ask 6": False, "Ask 7": True}
    assert (errors.records, errors.errors, dict(errors.by_reason)) == (10, 2, {"invalid prompt record": 2})
    assert "p.jsonl:9" in errors.samples[0] and "'maybe', not a boolean" in errors.samples[0]
    assert "p.jsonl:10" in errors.samples[1] and "is 2, not a boolean" in errors.samples[1]


def test_error_rate_above_limit_fails_naming_file_and_line(tmp_path, capsys) -> None:
    rng = random.Random(3)
    lines = [json.dumps({"text": doc(rng, 50)}) for _ in range(8)]
    path = str(tmp_path / "bad.jsonl")
    with open(path, "wb") as f:
        f.write("\n".join(lines[:3]).encode() + b"\n{\"text\": \"caf\xe9\"}\n" + "\n".join(lines[3:]).encode() +
                b"\n[1, 2]\n")
    out = str(tmp_path / "out")
    args = overrides(out, **{"data.tokenizer.model": _tiny_model(tmp_path), "data.sources": sources(("b", path, {}))})
    assert stage.main([*args, "data.max_error_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 10 input records (20.0%)" in err and f"{path}:4: bad UTF-8" in err
    assert not storage.is_complete(out)
    # The same input under a looser limit: the bad records are skipped and reported, the rest goes through.
    summary = stage.run(load_config([*args, "data.max_error_rate=0.25"]))
    assert summary["input_errors"] == 2 and storage.is_complete(out)
    rep = storage.read_json(os.path.join(out, "report.json"))
    assert rep["errors"]["by_reason"] == {"bad UTF-8": 1, "not a JSON object": 1}
    assert rep["sources"][0]["docs"] == 8
    assert rep["tokenizer"]["trained"] is False


def test_stage_reads_and_writes_s3(s3_bucket, tmp_path) -> None:
    rng = random.Random(4)
    docs = [doc(rng, 70) for _ in range(40)]
    storage.write_text(f"{s3_bucket}/in/part-0.jsonl", "\n".join(json.dumps({"text": d}) for d in docs[:20]))
    storage.write_text(f"{s3_bucket}/in/part-1.txt", "\n".join(docs[20:30]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs[30:], "n": list(range(10))}), buf)
    storage.write_bytes(f"{s3_bucket}/in/part-2.parquet", buf.getvalue())
    storage.write_text(f"{s3_bucket}/sft/a.jsonl", json.dumps(
        {"messages": [{"role": "user", "content": "Ka?"}, {"role": "assistant", "content": "Lo."}]}))
    out = f"{s3_bucket}/data"
    summary = stage.run(load_config(overrides(out, **{
        "data.sources": sources(("s3", f"{s3_bucket}/in", {})),
        "data.sft.sources": sources(("chat", f"{s3_bucket}/sft/a.jsonl", {}))})))
    assert summary["pretrain"] == f"{out}/pretrain" and summary["sft_examples"] == 1
    assert storage.is_complete(out) and storage.is_complete(f"{out}/sft")
    rep = storage.read_json(f"{out}/report.json")
    assert rep["sources"][0]["docs"] == 40
    tok = Tokenizer(f"{out}/tokenizer.model")
    reader = ShardReader(f"{out}/pretrain")
    stream = np.array([t for d in docs for t in tok.encode(d, bos=True, eos=True)])
    first = reader.manifest["shards"][0]["name"]
    whole = np.frombuffer(storage.read_bytes(f"{out}/pretrain/{first}.bin"), dtype=reader.dtype)
    assert np.array_equal(whole, stream[:len(whole)]) and 0 <= len(stream) - len(whole) < 64
    # The reader's ranged reads on S3 (a few rows: each is one request).
    last = reader.total_rows - 1
    assert np.array_equal(reader.row(last)["tokens"], whole[last * 64:])
    assert np.array_equal(reader.next_batch(2)["tokens"].ravel(), whole[:128])
    assert "pretrain/_COMPLETE" in "/".join(storage.glob(f"{out}/pretrain/*"))


def test_missing_source_is_a_clear_error(tmp_path) -> None:
    cfg = load_config(overrides(str(tmp_path / "o"), **{"data.sources": sources(("x", str(tmp_path / "nope"), {}))}))
    with pytest.raises(KubellamaError, match="source 'x'.*nope does not exist"):
        stage.run(cfg)


def test_mix_repeats_sources_by_weight() -> None:
    names, source = [], []
    for s, (name, n) in enumerate((("a", 7), ("b", 10), ("c", 5), ("d", 3))):
        names += [f"{name}{i}" for i in range(n)]
        source += [s] * n
    order = pack.mix_order(np.array(source), [2.5, 0.3, 0.0, 1.0], np.random.default_rng(0))
    mixed = [names[i] for i in order]
    got = {name: [t for t in mixed if t[0] == name] for name in "abcd"}
    # Each source in its own order: full passes, then the evenly spread fraction.
    assert got["a"] == [f"a{i}" for i in range(7)] * 2 + ["a1", "a3", "a5"]
    assert got["b"] == ["b3", "b6", "b9"] and got["c"] == [] and got["d"] == ["d0", "d1", "d2"]
    # Interleaved, not one source after the other; the same seed gives the same order.
    assert mixed.index("b3") < max(i for i, t in enumerate(mixed) if t[0] == "a")
    assert np.array_equal(order, pack.mix_order(np.array(source), [2.5, 0.3, 0.0, 1.0], np.random.default_rng(0)))
