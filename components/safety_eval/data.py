"""The benchmarks' datasets in their published formats (TruthfulQA, ToxiGen, BOLD, refusal prompt sets), at any
fsspec URL, and the data prep stage's prompt sets.

A malformed record fails the stage with one line naming the file and line: a benchmark quietly measured on part
of its data would read as the whole.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubellama.components.core.data.chat import prompt_text
from kubellama.components.core.data.readers import ErrorLog, list_files, read_records
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage

PROMPT_SPLIT = "eval"  # the data prep split held out for evaluation


@dataclass
class Question:
    question: str
    best: str
    true: list[str]
    false: list[str]
    category: str = ""
    # The false answers MC1 compares the best one with, when they differ from MC2's (mc_task.json's mc1 set).
    mc1_false: list[str] | None = None

    @property
    def mc1_choices(self) -> list[str]:
        return self.mc1_false or self.false


@dataclass
class Prompt:
    text: str
    group: str
    source: str
    domain: str = ""


def _close(answer: str) -> str:
    """TruthfulQA's reference code ends every answer with a period."""
    answer = answer.strip()
    return answer if not answer or answer.endswith(".") else answer + "."


def _split_answers(text: str) -> list[str]:
    return [_close(a) for a in (text or "").split(";") if a.strip()]


def _csv_rows(url: str) -> Iterator[tuple[dict, str]]:
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KubellamaError(f"{url}: not UTF-8 ({exc})") from None
    # Line numbers of the file (a quoted field may span lines), for errors people can find.
    reader = csv.DictReader(io.StringIO(text))
    for rec in reader:
        yield rec, f"{url}:{reader.line_num}"


def _records(url: str) -> Iterator[tuple[dict, str]]:
    """Records of one JSON/JSONL/Parquet/YAML file; the first malformed one fails with its file:line."""
    errors = ErrorLog(1)
    yield from read_records(url, errors, text_field="prompt")
    errors.check(0.0)


def _targets(value: Any, where: str, key: str) -> tuple[list[str], list[int]]:
    """(choices, labels) of an mc target set in either published shape."""
    if isinstance(value, dict) and "choices" in value and "labels" in value:
        choices, labels = list(value["choices"]), [int(x) for x in value["labels"]]
    elif isinstance(value, dict):
        choices, labels = list(value), [int(v) for v in value.values()]
    else:
        raise KubellamaError(f"{where}: {key} is neither {{answer: label}} nor {{choices, labels}}")
    if len(choices) != len(labels) or not all(isinstance(c, str) for c in choices):
        raise KubellamaError(f"{where}: {key} has {len(choices)} choices and {len(labels)} labels")
    return choices, labels


def _mc_question(rec: dict, where: str) -> Question:
    if not isinstance(rec.get("question"), str):
        raise KubellamaError(f"{where}: no question")
    c1, l1 = _targets(rec.get("mc1_targets"), where, "mc1_targets")
    c2, l2 = _targets(rec.get("mc2_targets", rec.get("mc1_targets")), where, "mc2_targets")
    if l1.count(1) != 1:
        raise KubellamaError(f"{where}: mc1_targets needs exactly one correct answer, has {l1.count(1)}")
    best = c1[l1.index(1)]
    true = [c for c, lab in zip(c2, l2) if lab == 1]
    # MC1 compares the best answer with its own false choices; MC2 uses the mc2 set's.
    false1 = [c for c, lab in zip(c1, l1) if lab == 0]
    false = [c for c, lab in zip(c2, l2) if lab == 0] or false1
    if best not in true:
        true = [best, *true]
    if not false1:
        raise KubellamaError(f"{where}: mc1_targets has no incorrect answer")
    return Question(rec["question"], best, true, false, str(rec.get("category", "")), false1)


def truthfulqa(url: str, limit: int = 0) -> list[Question]:
    out: list[Question] = []
    for f in list_files(url, "truthfulqa"):
        if f.lower().endswith(".csv"):
            for rec, where in _csv_rows(f):
                if not (rec.get("Question") or "").strip():
                    raise KubellamaError(f"{where}: no Question (expected TruthfulQA.csv columns Question, "
                                         f"Best Answer, Correct Answers, Incorrect Answers)")
                best = _close(rec.get("Best Answer") or "")
                true, false = _split_answers(rec.get("Correct Answers", "")), \
                    _split_answers(rec.get("Incorrect Answers", ""))
                if not best or not false:
                    raise KubellamaError(f"{where}: needs a Best Answer and at least one Incorrect Answer")
                if best not in true:
                    true = [best, *true]
                out.append(Question(rec["Question"].strip(), best, true, false, rec.get("Category", "")))
        else:
            out += [_mc_question(rec, where) for rec, where in _records(f)]
    if not out:
        raise KubellamaError(f"{url}: no TruthfulQA questions")
    return out[:limit] if limit else out


_TOXIGEN = re.compile(r"^(hate|neutral)_(.+?)(_1k)?$")
_RTP = re.compile(r"^rtp_(.+)$")


def _group_of(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    m = _TOXIGEN.match(stem) or _RTP.match(stem)
    if m:
        return m.group(2) if m.re is _TOXIGEN else m.group(1)
    return stem


def prompt_files(urls: Sequence[str], name: str) -> list[Prompt]:
    """Prompts of files or folders in any published prompt format; group = ToxiGen target group, RTP category,
    a record's target_group/category, or the file name."""
    out: list[Prompt] = []
    for url in urls:
        for f in list_files(url, name):
            group = _group_of(f)
            rows: Iterator[tuple[dict, str]]
            if f.lower().endswith(".csv"):
                # CSV headers vary in case (AdvBench `goal`, TruthfulQA `Question`).
                rows = (({(k or "").strip().lower(): v for k, v in rec.items()}, where) for rec, where in _csv_rows(f))
            elif f.lower().endswith(".txt"):
                rows = _text_rows(f)
            else:
                rows = _records(f)
            for rec, where in rows:
                text = prompt_text(rec, "prompt") or (rec.get("goal") if isinstance(rec.get("goal"), str) else None)
                if not text or not text.strip():
                    raise KubellamaError(f"{where}: no prompt text (tried prompt, goal, instruction, question, "
                                         f"value, text)")
                g = rec.get("target_group") or rec.get("group") or group
                out.append(Prompt(text, str(g), name))
    return out


def _text_rows(url: str) -> Iterator[tuple[dict, str]]:
    """One prompt a line; ToxiGen writes each prompt's statements on one line, separated by a literal `\\n`."""
    errors = ErrorLog(1)
    for rec, where in read_records(url, errors, fmt="text", text_field="prompt"):
        yield {"prompt": rec["prompt"].replace("\\n", "\n")}, where
    errors.check(0.0)


def per_group(prompts: Sequence[Prompt], limit: int) -> list[Prompt]:
    """The first `limit` prompts of each group (all when 0), in file order."""
    if not limit:
        return list(prompts)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for p in prompts:
        key = (p.domain, p.group)
        if seen[key] < limit:
            seen[key] += 1
            out.append(p)
    return out


def bold(url: str, limit: int = 0) -> list[Prompt]:
    out: list[Prompt] = []
    for f in list_files(url, "bold"):
        stem = os.path.splitext(os.path.basename(f))[0]
        domain = stem.removesuffix("_prompt")
        if f.lower().endswith(".json"):
            try:
                data = json.loads(storage.read_text(f))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise KubellamaError(f"{f}: not JSON ({exc})") from None
            if isinstance(data, dict):
                for group, entities in data.items():
                    if not isinstance(entities, dict):
                        raise KubellamaError(f"{f}: group '{group}' is not {{entity: [prompts]}}")
                    for entity, prompts in entities.items():
                        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                            raise KubellamaError(f"{f}: {group}/{entity} is not a list of prompts")
                        out += [Prompt(p, group, "bold", domain) for p in prompts]
                continue
        for rec, where in _records(f):
            prompts = rec.get("prompts")
            if not isinstance(prompts, list) or not rec.get("category"):
                raise KubellamaError(f"{where}: a BOLD record needs category and prompts")
            out += [Prompt(p, str(rec["category"]), "bold", str(rec.get("domain") or domain)) for p in prompts]
    if not out:
        raise KubellamaError(f"{url}: no BOLD prompts")
    return per_group(out, limit)


def prep_prompts(data: str) -> list[dict[str, Any]]:
    """The data prep stage's evaluation prompts ({id, prompt, safety, source}); none when it wrote no prompt sets."""
    url = storage.join(data, "prompts", f"{PROMPT_SPLIT}.jsonl") if data else ""
    if not url or not storage.exists(url):
        return []
    return [rec for rec, _ in _records(url)]
