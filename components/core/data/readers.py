"""Stream records out of JSONL, JSON, Parquet, PyRIT seed (YAML) and plain-text files at any fsspec URL.

Records come one at a time with where they came from (`file:line`) and their position in the file (stable whatever
the split: it names the document for dedup and mixing). A file can be read in parts (a byte range of a line file, a
range of Parquet row groups); compressed files are decompressed on the fly; malformed input goes to an `ErrorLog`.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.utils import infer_compression

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".prompt": "yaml", ".yaml": "yaml",
           ".yml": "yaml"}
# Suffixes of codecs fsspec reads only with an optional package.
_OPTIONAL_CODECS = {"zst": "zstandard", "zstd": "zstandard", "lz4": "lz4", "sz": "python-snappy"}

Positioned = Iterator[tuple[dict, str, int]]


class ErrorLog:
    """Counts good and bad input records; keeps a few bad ones (file:line and why) for the report.

    `cleaners` holds the record cleaning the stage applies to some kinds of records (SFT dialogs, preference pairs:
    clean.RecordCleaner), keyed by kind; the stage's record reader looks it up here.
    """

    def __init__(self, max_samples: int = 20):
        self.records = 0
        self.errors = 0
        self.by_reason: Counter[str] = Counter()
        self.samples: list[str] = []
        self.max_samples = max_samples
        self.cleaners: dict[str, Callable[[dict], dict | None]] = {}

    def ok(self) -> None:
        self.records += 1

    def bad(self, where: str, reason: str, detail: str = "") -> None:
        self.records += 1
        self.errors += 1
        self.by_reason[reason] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def add(self, summary: dict[str, Any]) -> None:
        """Count in another log's `summary()` (a worker's), its samples after this log's own."""
        self.records += summary["records"]
        self.errors += summary["errors"]
        self.by_reason.update(summary["by_reason"])
        self.samples += summary["samples"][:max(0, self.max_samples - len(self.samples))]

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


def list_sized(url: str, name: str = "") -> list[tuple[str, int]]:
    """(url, size in bytes) of the files of a source: the file itself, every file below a folder, or a glob's
    matches; sorted. One listing call, not one per file (a corpus has thousands)."""
    label = f"source '{name}'" if name else "source"
    if not url:
        raise KubellamaError(f"{label} has no path")
    fs, path = storage.filesystem(url)
    remote = storage.is_remote(url)
    proto = url.split("://", 1)[0] if remote else ""

    def where(p: str) -> str:
        return f"{proto}://{p}" if remote else p

    if any(c in url for c in "*?["):
        found = {where(p): info.get("size", 0) for p, info in fs.glob(path, detail=True).items()
                 if info.get("type") != "directory"}
    elif fs.isdir(path):
        found = {}
        for p, info in fs.find(path, detail=True).items():
            rel = posixpath.relpath(p, path)
            found[storage.join(url, *rel.split("/"))] = info.get("size", 0)
    elif fs.exists(path):
        found = {url: fs.info(path).get("size", 0)}
    else:
        raise KubellamaError(f"{label}: {url} does not exist")
    # Hidden files and markers (_COMPLETE, .tmp files) are not data.
    files = [(f, int(s or 0)) for f, s in found.items()
             if not os.path.basename(f.rstrip("/")).startswith((".", "_"))]
    if not files:
        raise KubellamaError(f"{label}: no input files at {url}")
    return sorted(files)


def list_files(url: str, name: str = "") -> list[str]:
    """The files of a source (see `list_sized`)."""
    return [f for f, _ in list_sized(url, name)]


def compression(url: str) -> str | None:
    """The codec a file is compressed with, from its name (None: not compressed)."""
    ext = os.path.splitext(url)[1].lower().lstrip(".")
    codec = infer_compression(url)
    if codec is None and ext in _OPTIONAL_CODECS:
        raise KubellamaError(f"{url}: reading .{ext} files needs the {_OPTIONAL_CODECS[ext]} package")
    return codec


def file_format(url: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in {"jsonl", "json", "parquet", "yaml", "text"}:
            raise KubellamaError(f"unknown input format '{fmt}' (auto, jsonl, json, parquet, yaml, text)")
        return fmt
    name = os.path.splitext(url)[0] if compression(url) else url
    return FORMATS.get(os.path.splitext(name)[1].lower(), "text")


def splittable(url: str, fmt: str, text_split: str) -> str:
    """How a file can be cut into parts: "bytes" (uncompressed line files), "rows" (Parquet) or "" (whole)."""
    kind = file_format(url, fmt)
    if kind == "parquet":
        return "rows"
    if compression(url) is None and (kind == "jsonl" or (kind == "text" and text_split == "line")):
        return "bytes"
    return ""


def read_records(url: str, errors: ErrorLog, fmt: str = "auto", text_field: str = "text",
                 text_split: str = "line") -> Iterator[tuple[dict, str]]:
    """(record, where) for each record of one file; text files give {text_field: text} records."""
    for rec, where, _ in read_positioned(url, errors, fmt, text_field, text_split):
        yield rec, where


def read_positioned(url: str, errors: ErrorLog, fmt: str = "auto", text_field: str = "text",
                    text_split: str = "line", start: int = 0, end: int | None = None) -> Positioned:
    """(record, where, position) for each record of a file, or of the part [start, end) of it: a byte range of a
    line file, a row-group range of a Parquet file (other files are read whole: start 0, end None)."""
    kind = file_format(url, fmt)
    if kind == "jsonl":
        yield from _jsonl(url, errors, start, end)
    elif kind == "json":
        yield from _json(url, errors)
    elif kind == "parquet":
        yield from _parquet(url, errors, start, end)
    elif kind == "yaml":
        yield from _yaml(url, errors)
    else:
        yield from _text(url, errors, text_field, text_split, start, end)


def _lines(url: str, errors: ErrorLog, start: int = 0, end: int | None = None) -> Iterator[tuple[str, str, int]]:
    """(line, where, byte offset) of the lines starting in [start, end); `where` is file:line from the file's start,
    file:byte N inside it (counting lines would mean reading everything before)."""
    with storage.open_file(url, "rb", compression="infer") as f:
        # zstandard's reader has no readline: buffer it (gzip's and bz2's have one).
        raw = f if isinstance(f, io.IOBase) else io.BufferedReader(f)
        pos = 0
        if start > 0:
            raw.seek(start - 1)
            pos = start - 1 + len(raw.readline())  # the rest of the line that began before `start` is not ours
        n = 0
        while end is None or pos < end:
            line = raw.readline()
            if not line:
                return
            n += 1
            where = f"{url}:{n}" if start == 0 else f"{url}:byte {pos}"
            try:
                yield line.decode("utf-8").rstrip("\r\n"), where, pos
            except UnicodeDecodeError as exc:
                errors.bad(where, "bad UTF-8", str(exc))
            pos += len(line)


def _jsonl(url: str, errors: ErrorLog, start: int, end: int | None) -> Positioned:
    for line, where, pos in _lines(url, errors, start, end):
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
        yield rec, where, pos


def _json(url: str, errors: ErrorLog) -> Positioned:
    try:
        with storage.open_file(url, "rb", compression="infer") as f:
            data = json.loads(f.read().decode("utf-8"))
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
        yield rec, where, i


def parquet_row_groups(url: str) -> list[int] | None:
    """Rows per row group of a Parquet file (its footer only); None when the file cannot be read as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_file(url, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError):
        return None


def _parquet(url: str, errors: ErrorLog, start: int, end: int | None) -> Positioned:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_file(url, "rb") as f:
            pf = pq.ParquetFile(f)
            groups = list(range(pf.num_row_groups))[start:end]
            n = sum(pf.metadata.row_group(i).num_rows for i in range(start))
            for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
                for rec in batch.to_pylist():
                    yield rec, f"{url}:row {n + 1}", n
                    n += 1
    except (pa.ArrowException, OSError, ValueError) as exc:
        # A truncated or corrupt file: counted like a malformed record, the rest of the corpus goes on.
        detail = str(exc).strip().splitlines()
        errors.bad(url, "unreadable Parquet", detail[0] if detail else type(exc).__name__)


def _yaml(url: str, errors: ErrorLog) -> Positioned:
    """PyRIT seed files: a YAML mapping whose `seeds` (or `prompts`) list holds {value: text} entries."""
    import yaml

    try:
        with storage.open_file(url, "rb", compression="infer") as f:
            data = yaml.safe_load(f.read().decode("utf-8"))
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
        yield rec, where, i


def _text(url: str, errors: ErrorLog, field: str, split: str, start: int, end: int | None) -> Positioned:
    if split == "line":
        for line, where, pos in _lines(url, errors, start, end):
            if line.strip():
                yield {field: line}, where, pos
        return
    if split != "paragraph":
        raise KubellamaError(f"unknown text_split '{split}' (line or paragraph)")
    para: list[str] = []
    first = ("", 0)
    for line, where, pos in _lines(url, errors):
        if line.strip():
            if not para:
                first = (where, pos)
            para.append(line)
        elif para:
            yield {field: "\n".join(para)}, *first
            para = []
    if para:
        yield {field: "\n".join(para)}, *first
