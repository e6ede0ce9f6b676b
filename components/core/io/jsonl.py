"""JSONL files written as splits: each file published whole, the folder marked complete last."""
from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

from kubellama.components.core.io import storage


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
