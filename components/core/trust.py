"""The trust boundary: what stages read from storage that another run or another person wrote.

A checkpoint, shard set or HF directory in a shared bucket is data, never code, and never a pointer elsewhere:
- DCP checkpoints are read through `reader` / `load` (components/core/trust_dcp.py): `.metadata` goes through an
  unpickler that only builds DCP's metadata types, non-tensor values through `torch.load(weights_only=True)`.
- Names read from files (DCP storage entries, shard manifests, HF index weight maps, archive members) must be plain
  file names in the folder that holds the file: see `safe_name`.
Every refusal is a `Refused` error: one line naming the file and what was wrong.

This module imports no torch, so data prep workers can check names without loading it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from components.core.errors import KubellamaError

if TYPE_CHECKING:
    from components.core.trust_dcp import SafeReader

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


def reader(url: str) -> SafeReader:
    """A DCP storage reader for checkpoint `url` that cannot be made to run code or read outside the folder."""
    from components.core.trust_dcp import SafeReader

    return SafeReader(url)


def load(state: dict[str, Any], url: str, failure: str = "cannot load the checkpoint", planner: Any = None) -> None:
    """dcp.load of `state` from `url` through `reader`; every failure is one KubellamaError line."""
    from components.core.trust_dcp import load as dcp_load

    dcp_load(state, url, failure, planner)
