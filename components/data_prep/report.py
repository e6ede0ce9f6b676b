"""The data prep stage's report: its tables, written by the core report writer from the same dict as report.json."""
from __future__ import annotations

from typing import Any

from components.core.report import Section, Table, write_report


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
    out.append(Section("Cleaning", tables=[Table(["dropped because", "documents"], list(c["dropped"].items())),
                                           Table(["PII scrubbed", "occurrences"], list(c["pii"].items()))]))
    t = rep["tokenizer"]
    out.append(Section("Tokenizer", tables=[Table(["", ""], [
        ["origin", "trained (SentencePiece BPE)" if t["trained"] else f"given: {t['from']}"],
        ["vocabulary", t["vocab_size"]], ["split digits", t["split_digits"]],
        ["byte fallback", t["byte_fallback"]], ["bytes per token", t.get("bytes_per_token", "-")],
        ["vocabulary used", t.get("vocab_used", "-")], ["sha256", f"`{t['sha256']}`"]])]))
    rows = []
    if rep.get("pretrain"):
        p = rep["pretrain"]
        rows.append(["pretrain", f"{p['tokens']:,} tokens in {p['rows']:,} rows, {p['shards']} shards, "
                     f"{p['documents']:,} documents", p["url"]])
    if rep.get("sft"):
        s = rep["sft"]
        rows.append(["sft", f"{s['examples']:,} examples ({s['eval']['examples']:,} held out; {s['multi_turn']:,} "
                     f"multi-turn, {s['chained']:,} chained from single turns) in {s['rows']:,} rows, "
                     f"{s['trained_tokens']:,} answer tokens, {s['truncated']} truncated", s["url"]])
    if rep.get("preference"):
        s = rep["preference"]
        rows.append(["preference", f"{s['train']:,} train / {s['eval']:,} eval pairs, "
                     f"{s['dropped_unsafe_chosen']} dropped (unsafe chosen), {s.get('synthetic', 0)} synthetic safety pairs; "
                     f"ratings {s['ratings']}", s["url"]])
    if rep.get("prompts"):
        s = rep["prompts"]
        rows.append(["prompts", ", ".join(f"{k} {s[k]} ({s[k + '_safety']} safety)" for k in ("rs", "ppo", "eval")),
                     s["url"]])
    if rows:
        out.append(Section("Datasets", tables=[Table(["dataset", "size", "url"], rows)]))
    e = rep["errors"]
    out.append(Section("Input errors", text=f"{e['errors']} of {e['records']} records malformed ({e['rate']:.2%}).",
                       tables=[Table(["reason", "records"], list(e["by_reason"].items()))] if e["by_reason"] else [],
                       items=[f"`{s}`" for s in e["samples"]]))
    return out


def write(rep: dict[str, Any]) -> dict[str, str]:
    """report.json (`rep` itself plus the report URLs), report.md and report.html in rep["output"]."""
    rows = [("output", f"`{rep['output']}`"), ("workers", rep["workers"]), ("seconds", rep["seconds"])]
    return write_report(rep["output"], "Data prep report", rep, rows=rows, sections=sections(rep))
