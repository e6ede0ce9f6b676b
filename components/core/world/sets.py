"""Where data prep puts the world's record sets, and how a stage finds and reads its held-out ones: the stages read
`<data prep output>/world/eval/<name>.jsonl` through here, never through data prep (stages do not import stages).
The world folder is published by its `_COMPLETE` marker, written after every file in it."""
from __future__ import annotations

import posixpath
from typing import Any

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.jsonl import read_lines

FOLDER = "world"
# The held-out sets, never in training data: task prompts, PPO's band calibration prompts, safety prompts, multi-turn
# dialogs (each a list of task records, one per turn) and preference pairs.
EVAL = ("tasks", "calib", "safety", "dialogs", "pairs")
# How far above a stage's data URL the data prep output may be (`<root>/sft`, `<root>/sft/dialogs`).
LEVELS = 2


def folder(root: str) -> str:
    """The world's folder in data prep output `root`."""
    return storage.join(root, FOLDER)


def eval_file(root: str, name: str) -> str:
    """Held-out set `name` in data prep output `root` (whether or not it exists)."""
    if name not in EVAL:
        raise KubellamaError(f"world eval set '{name}' is not one of {', '.join(EVAL)}")
    return storage.join(folder(root), "eval", f"{name}.jsonl")


def _roots(data: str) -> list[str]:
    """`data` and up to LEVELS folders above it, never above a bucket (s3://bucket) or the filesystem root."""
    url = data.rstrip("/")
    out = [url]
    for _ in range(LEVELS):
        head = posixpath.dirname(url)
        if not head or head == url or ("://" in head and not head.split("://", 1)[1]) or head.endswith(":"):
            break
        url = head
        out.append(url)
    return out


def eval_url(data: str, name: str) -> str | None:
    """Held-out set `name` of the data prep output that a stage's data URL `data` is (or is a subfolder of, such as
    `<root>/sft`); None when that output has no finished world (data.world.enabled was off)."""
    if not data:
        return None
    for root in _roots(data):
        if storage.is_complete(folder(root)):
            url = eval_file(root, name)
            return url if storage.exists(url) else None
    return None


def read(url: str) -> list[Any]:
    """The records of a world file, as the world built them (dicts; a dialog is a list of task records). A bad line
    is one error naming the file and line."""
    lines, _ = read_lines(url, "no such world file (run data prep with data.world.enabled=true)")
    return [rec for _, rec in lines]
