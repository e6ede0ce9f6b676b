"""JSONL files: read line by line (one error naming the file and line), and written as splits (each file published
whole, the folder marked complete last)."""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage


def read_lines(url: str, missing: str) -> tuple[list[tuple[int, object]], str]:
    """(line number, parsed record) of every non-blank line of a JSONL file, and the file's sha256 (what a run's
    fingerprint records); `missing` is the error's advice when the file does not exist."""
    if not storage.exists(url):
        raise KubellamaError(f"{url}: {missing}")
    raw = storage.read_bytes(url)
    out = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise KubellamaError(f"{url}:{n}: malformed JSON ({exc.msg})") from None
    return out, hashlib.sha256(raw).hexdigest()


@contextlib.contextmanager
def jsonl_splits(url: str, splits: Sequence[str], counts: Counter[str]) -> Iterator[Callable[[str, dict], None]]:
    """write(split, record) into url/<split>.jsonl; each file is published whole, the folder marked last."""
    storage.remove(storage.join(url, storage.COMPLETE))
    with ExitStack() as stack:
        files = {s: stack.enter_context(storage.atomic_write(storage.join(url, f"{s}.jsonl"))) for s in splits}

        def write(split: str, rec: dict) -> None:
            files[split].write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
            counts[split] += 1

        yield write
    storage.mark_complete(url, dict(counts))
