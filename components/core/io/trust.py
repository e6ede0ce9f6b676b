"""The trust boundary's base: what stages read from storage that another run or another person wrote is data,
never code, and never a pointer elsewhere (DCP checkpoints: core/train/safe_dcp.py).
- Names read from files (DCP storage entries, shard manifests, HF index weight maps, archive members) must be plain
  file names in the folder that holds the file: see `safe_name`.
Every refusal is a `Refused` error: one line naming the file and what was wrong.

This module imports no torch, so data prep workers can check names without loading it.
"""
from __future__ import annotations

import re
from typing import Any

from kubellama.components.core.errors import KubellamaError

# Control characters and the separators of every filesystem and URL scheme kubellama reads through.
_BAD = re.compile(r"[/\\:\x00-\x1f\x7f]")


class Refused(KubellamaError):
    """Data from storage that is not what it claims to be; nothing of it has been used."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def safe_name(name: Any, where: str) -> str:
    """`name`, read from file `where`, if it is a plain file name inside the folder: no separator, no scheme, no
    `..`, not absolute, not empty. Anything else could point a reader at another object or a local file."""
    if not isinstance(name, str) or name in ("", ".", "..") or _BAD.search(name):
        raise Refused(f"{where}: refused file name {name!r} (only a plain file name in the same folder is allowed)")
    return name

