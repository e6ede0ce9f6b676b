"""report.md of the data prep stage, rendered from the same dict as report.json."""
from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(rep: dict[str, Any]) -> str:
    out = ["# Data prep report", "", f"Output: `{rep['output']}`, {rep['workers']} workers, {rep['seconds']} s.", ""]
    mix = (rep.get("pretrain") or {}).get("mix", {})
    if rep["sources"]:
        out += ["## Pretraining sources", ""]
        out += _table(["source", "weight", "docs in", "kept", "dropped", "tokens (after mix)"],
                      [[s["name"], s["weight"], s["docs_in"], s["docs"],
                        ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "-",
                        mix.get(s["name"], {}).get("tokens", 0)] for s in rep["sources"]])
    c = rep["clean"]
    out += ["## Cleaning", ""]
    out += _table(["dropped because", "documents"], [[k, v] for k, v in c["dropped"].items()])
    out += _table(["PII scrubbed", "occurrences"], [[k, v] for k, v in c["pii"].items()])
    t = rep["tokenizer"]
    out += ["## Tokenizer", ""]
    out += _table(["", ""], [
        ["origin", "trained (SentencePiece BPE)" if t["trained"] else f"given: {t['from']}"],
        ["vocabulary", t["vocab_size"]], ["split digits", t["split_digits"]],
        ["byte fallback", t["byte_fallback"]], ["bytes per token", t.get("bytes_per_token", "-")],
        ["vocabulary used", t.get("vocab_used", "-")], ["sha256", f"`{t['sha256']}`"]])
    p = rep.get("pretrain")
    if p:
        out += ["## Datasets", ""]
    rows = []
    if p:
        rows.append(["pretrain", f"{p['tokens']:,} tokens in {p['rows']:,} rows, {p['shards']} shards, "
                     f"{p['documents']:,} documents", p["url"]])
    if rep.get("sft"):
        s = rep["sft"]
        rows.append(["sft", f"{s['examples']:,} examples in {s['rows']:,} rows, {s['trained_tokens']:,} answer "
                     f"tokens, {s['truncated']} truncated", s["url"]])
    if rep.get("preference"):
        s = rep["preference"]
        rows.append(["preference", f"{s['train']:,} train / {s['eval']:,} eval pairs, "
                     f"{s['dropped_unsafe_chosen']} dropped (unsafe chosen); ratings {s['ratings']}", s["url"]])
    if rep.get("prompts"):
        s = rep["prompts"]
        rows.append(["prompts", ", ".join(f"{k} {s[k]} ({s[k + '_safety']} safety)" for k in ("rs", "ppo", "eval")),
                     s["url"]])
    if rows:
        if not p:
            out += ["## Datasets", ""]
        out += _table(["dataset", "size", "url"], rows)
    e = rep["errors"]
    out += ["## Input errors", "", f"{e['errors']} of {e['records']} records malformed ({e['rate']:.2%}).", ""]
    if e["by_reason"]:
        out += _table(["reason", "records"], [[k, v] for k, v in e["by_reason"].items()])
    if e["samples"]:
        out += ["Samples:", ""] + [f"- `{s}`" for s in e["samples"]] + [""]
    return "\n".join(out)
