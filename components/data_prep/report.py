"""The data prep stage's report: its tables, written by the core report writer from the same dict as report.json,
and the stage's small result (`summary`)."""
from __future__ import annotations

from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, write_report


def sections(rep: dict[str, Any]) -> list[Section]:
    out = []
    mix = (rep.get("pretrain") or {}).get("mix", {})
    if rep["sources"]:
        out.append(Section("Pretraining sources", tables=[Table(
            ["source", "weight", "docs in", "kept", "dropped", "tokens (after mix)"],
            [[s["name"], s["weight"], s["docs_in"], s["docs"],
              ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-",
              mix.get(s["name"], {}).get("tokens", 0)] for s in rep["sources"]])]))
    c = rep["clean"]
    dedup = c.get("dedup")
    out.append(Section("Cleaning", text=(
        f"Global dedup over {dedup['partitions']} partitions: {dedup['candidate_pairs']} candidate pairs from shared "
        f"LSH buckets, {dedup['confirmed_pairs']} confirmed; largest partition {dedup['largest_partition_bytes']:,} "
        f"bytes of keys.") if dedup else "",
        tables=[Table(["dropped because", "documents"], list(c["dropped"].items())),
                Table(["PII scrubbed", "occurrences"], list(c["pii"].items()))]))
    cleaned = [(k, rep[k]["clean"]) for k in ("sft", "preference") if rep.get(k) and rep[k].get("clean")]
    if cleaned:
        out.append(Section("SFT and preference cleaning", text=(
            "Applied to every string of each record: " + ", ".join(cleaned[0][1]["applied"]) + ". Not applied: "
            "quality filters (short answers are good answers) and near dedup (a shared system prompt or a templated "
            "refusal would merge distinct examples)."), tables=[Table(
                ["dataset", "kept", "dropped (exact duplicates)", "PII scrubbed"],
                [[k, v["kept"], v["dropped"].get("dup_exact", 0),
                  ", ".join(f"{p} {n}" for p, n in v["pii"].items() if n) or "-"] for k, v in cleaned])]))
    t = rep["tokenizer"]
    out.append(Section("Tokenizer", tables=[Table(["", ""], [
        ["origin", "trained (SentencePiece BPE)" if t["trained"] else f"given: {t['from']}"],
        ["vocabulary", t["vocab_size"]], ["split digits", t["split_digits"]],
        ["byte fallback", t["byte_fallback"]], ["bytes per token", t.get("bytes_per_token", "-")],
        ["vocabulary used", t.get("vocab_used", "-")], ["sha256", f"`{t['sha256']}`"]])]))
    rows = []
    if rep.get("pretrain"):
        p = rep["pretrain"]
        rows.append(["pretrain", (f"{p['tokens']:,} tokens in {p['rows']:,} rows, {p['shards']} shards, "
                     f"{p['documents']:,} documents"), p["url"]])
    if rep.get("sft"):
        s = rep["sft"]
        rows.append(["sft", (f"{s['examples']:,} examples ({s['eval']['examples']:,} held out; {s['multi_turn']:,} "
                     f"multi-turn, {s['chained']:,} chained from single turns) in {s['rows']:,} rows, "
                     f"{s['trained_tokens']:,} answer tokens, {s['truncated']} truncated"), s["url"]])
    if rep.get("preference"):
        s = rep["preference"]
        rows.append(["preference", (f"{s['train']:,} train / {s['eval']:,} eval pairs, "
                     f"{s['dropped_unsafe_chosen']} dropped (unsafe chosen), {s.get('synthetic', 0)} synthetic "
                     f"safety pairs; ratings {s['ratings']}"), s["url"]])
    if rep.get("prompts"):
        s = rep["prompts"]
        rows.append(["prompts", ", ".join(f"{k} {s[k]} ({s[k + '_safety']} safety)" for k in ("rs", "ppo", "eval")),
                     s["url"]])
    if rows:
        out.append(Section("Datasets", tables=[Table(["dataset", "size", "url"], rows)]))
    w = rep.get("world")
    if w:
        c = w["counts"]
        out.append(Section("World", text=(
            "The rule-checked world (data.world): its pretraining text, dialogs, pairs and RS/PPO prompts are mixed "
            f"into the datasets above (sources world, world_rs, world_ppo; files in {w['url']}); its held-out sets "
            "are in no dataset."),
            tables=[Table(["set", "records", "url"],
                          [[k, c[k], u] for k, u in w["files"].items()]
                          + [[f"eval: {k}", c[f"eval_{k}"], u] for k, u in w["eval"].items()])]))
    f = rep.get("fanout")
    if f:
        w = f["workers"]
        t = f["timing"]
        slow = ", ".join(str(i) for i in w["stragglers"])
        out.append(Section("Workers", text=(
            f"{f['units']} work units over {f['parallelism']} workers, {f['reducers']} dedup reducers, "
            f"{f['groups']} pack groups. Skew (slowest worker over the mean): {w['skew']:.2f}"
            + (f"; straggler: worker {slow}" if slow else "") + ". Time (s): " +
            ", ".join(f"{k} {t[k]}" for k in ("plan", "workers", "dedup", "pack", "merge", "total")) +
            f"; the merge is {t['merge_share']:.1%} of it."),
            tables=[Table(["worker", "units", "MB", "docs in", "kept", "tokens", "errors", "seconds", "docs/s",
                           "MB/s"],
                          [[x["index"], x["units"], x["mb"], x["docs_in"], x["kept"], x["tokens"], x["errors"],
                            x["seconds"], x["docs_per_s"], x["mb_per_s"]] for x in w["tasks"]])]))
    e = rep["errors"]
    out.append(Section("Input errors", text=f"{e['errors']} of {e['records']} records malformed ({e['rate']:.2%}).",
                       tables=[Table(["reason", "records"], list(e["by_reason"].items()))] if e["by_reason"] else [],
                       items=[f"`{s}`" for s in e["samples"]]))
    return out


def write(rep: dict[str, Any]) -> dict[str, str]:
    """report.json (`rep` itself plus the report URLs), report.md and report.html in rep["output"]."""
    rows = [("output", f"`{rep['output']}`"), ("workers", rep["workers"]), ("seconds", rep["seconds"])]
    return write_report(rep["output"], "Data prep report", rep, rows=rows, sections=sections(rep))


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """The small JSON-able result: URLs and headline numbers."""
    out = rep["output"]
    s: dict[str, Any] = {"output": out, "tokenizer": rep["tokenizer"]["url"],
                         "report_json": storage.join(out, "report.json"), "report_md": storage.join(out, "report.md"),
                         "report_html": storage.join(out, "report.html"),
                         "vocab_size": rep["tokenizer"]["vocab_size"],
                         "input_errors": rep["errors"]["errors"], "seconds": rep["seconds"]}
    for key in ("pretrain", "sft", "preference", "prompts", "world"):
        if rep.get(key):
            s[key] = rep[key]["url"]
    if rep.get("pretrain"):
        s["pretrain_tokens"] = rep["pretrain"]["tokens"]
        s["bytes_per_token"] = rep["pretrain"]["bytes_per_token"]
    s["dropped"] = sum(rep["clean"]["dropped"].values())
    s["pii_scrubbed"] = sum(rep["clean"]["pii"].values())
    if rep.get("sft"):
        s["sft_examples"] = sum(rep["sft"]["sources"].values())  # source dialogs, chained ones not counted
    if rep.get("preference"):
        s["preference_pairs"] = rep["preference"]["train"] + rep["preference"]["eval"]
    return s
