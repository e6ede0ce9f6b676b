"""Stream records out of JSONL, JSON, Parquet, PyRIT seed (YAML) and plain-text files at any fsspec URL.

Records come one at a time with where they came from (`file:line`), so nothing holds a whole corpus in memory
(JSON arrays and YAML seed files, which cannot be streamed, are the exception: they are small by nature).
Malformed input is reported to an `ErrorLog` and skipped; the stage decides at the end whether the error rate is
acceptable.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from typing import Any, Iterator

from components.core import storage
from components.core.errors import KubellamaError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".prompt": "yaml", ".yaml": "yaml",
           ".yml": "yaml"}


class ErrorLog:
    """Counts good and bad input records; keeps a few bad ones (file:line and why) for the report."""

    def __init__(self, max_samples: int = 20):
        self.records = 0
        self.errors = 0
        self.by_reason: Counter[str] = Counter()
        self.samples: list[str] = []
        self.max_samples = max_samples

    def ok(self) -> None:
        self.records += 1

    def bad(self, where: str, reason: str, detail: str = "") -> None:
        self.records += 1
        self.errors += 1
        self.by_reason[reason] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def rate(self) -> float:
        return self.errors / self.records if self.records else 0.0

    def check(self, max_rate: float) -> None:
        if self.errors and self.rate > max_rate:
            raise KubellamaError(
                f"{self.errors} of {self.records} input records ({self.rate:.1%}) are malformed, above "
                f"data.max_error_rate={max_rate}; first: {self.samples[0]}")

    def summary(self) -> dict[str, Any]:
        return {"records": self.records, "errors": self.errors, "rate": round(self.rate, 6),
                "by_reason": dict(self.by_reason), "samples": list(self.samples)}


def list_files(url: str, name: str = "") -> list[str]:
    """The files of a source: the file itself, every file below a folder, or a glob's matches; sorted."""
    label = f"source '{name}'" if name else "source"
    if not url:
        raise KubellamaError(f"{label} has no path")
    if any(c in url for c in "*?["):
        found = storage.glob(url)
    elif storage.isdir(url):
        fs, path = storage.filesystem(url)
        rels = [posixpath.relpath(p, path) for p in fs.find(path)]
        found = [storage.join(url, *r.split("/")) for r in rels]
    elif storage.exists(url):
        found = [url]
    else:
        raise KubellamaError(f"{label}: {url} does not exist")
    # Hidden files and markers (_COMPLETE, .tmp files) are not data.
    files = [f for f in found if not os.path.basename(f.rstrip("/")).startswith((".", "_"))]
    if not files:
        raise KubellamaError(f"{label}: no input files at {url}")
    return sorted(files)


def file_format(url: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in {"jsonl", "json", "parquet", "yaml", "text"}:
            raise KubellamaError(f"unknown input format '{fmt}' (auto, jsonl, json, parquet, yaml, text)")
        return fmt
    return FORMATS.get(os.path.splitext(url)[1].lower(), "text")


def read_records(url: str, errors: ErrorLog, fmt: str = "auto", text_field: str = "text",
                 text_split: str = "line") -> Iterator[tuple[dict, str]]:
    """(record, where) for each record of one file; text files give {text_field: text} records."""
    kind = file_format(url, fmt)
    if kind == "jsonl":
        yield from _jsonl(url, errors)
    elif kind == "json":
        yield from _json(url, errors)
    elif kind == "parquet":
        yield from _parquet(url)
    elif kind == "yaml":
        yield from _yaml(url, errors)
    else:
        yield from _text(url, errors, text_field, text_split)


def _lines(url: str, errors: ErrorLog) -> Iterator[tuple[str, str]]:
    with storage.open_file(url, "rb") as raw:
        for n, line in enumerate(raw, 1):
            where = f"{url}:{n}"
            try:
                yield line.decode("utf-8").rstrip("\r\n"), where
            except UnicodeDecodeError as exc:
                errors.bad(where, "bad UTF-8", str(exc))


def _jsonl(url: str, errors: ErrorLog) -> Iterator[tuple[dict, str]]:
    for line, where in _lines(url, errors):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.bad(where, "malformed JSON", exc.msg)
            continue
        if not isinstance(rec, dict):
            errors.bad(where, "not a JSON object")
            continue
        yield rec, where


def _json(url: str, errors: ErrorLog) -> Iterator[tuple[dict, str]]:
    try:
        data = json.loads(storage.read_bytes(url).decode("utf-8"))
    except UnicodeDecodeError as exc:
        errors.bad(url, "bad UTF-8", str(exc))
        return
    except json.JSONDecodeError as exc:
        errors.bad(f"{url}:{exc.lineno}", "malformed JSON", exc.msg)
        return
    items = data if isinstance(data, list) else [data]
    for i, rec in enumerate(items):
        where = f"{url}[{i}]"
        if not isinstance(rec, dict):
            errors.bad(where, "not a JSON object")
            continue
        yield rec, where


def _parquet(url: str) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    with storage.open_file(url, "rb") as f:
        n = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield rec, f"{url}:row {n}"


def _yaml(url: str, errors: ErrorLog) -> Iterator[tuple[dict, str]]:
    """PyRIT seed files: a YAML mapping whose `seeds` (or `prompts`) list holds {value: text} entries."""
    import yaml

    try:
        data = yaml.safe_load(storage.read_bytes(url).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        errors.bad(url, "malformed YAML", str(exc).splitlines()[0])
        return
    items = (data.get("seeds") or data.get("prompts") or []) if isinstance(data, dict) else data
    for i, rec in enumerate(items if isinstance(items, list) else []):
        where = f"{url}[{i}]"
        if isinstance(rec, str):
            rec = {"value": rec}
        if not isinstance(rec, dict):
            errors.bad(where, "not a mapping")
            continue
        yield rec, where


def _text(url: str, errors: ErrorLog, field: str, split: str) -> Iterator[tuple[dict, str]]:
    if split == "line":
        for line, where in _lines(url, errors):
            if line.strip():
                yield {field: line}, where
        return
    if split != "paragraph":
        raise KubellamaError(f"unknown text_split '{split}' (line or paragraph)")
    para: list[str] = []
    start = ""
    for line, where in _lines(url, errors):
        if line.strip():
            if not para:
                start = where
            para.append(line)
        elif para:
            yield {field: "\n".join(para)}, start
            para = []
    if para:
        yield {field: "\n".join(para)}, start
