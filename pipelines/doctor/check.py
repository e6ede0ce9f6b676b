"""One preflight result: a line `ok  <what>` or `MISSING <what>: <how to fix>`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"ok  {self.what}" if self.ok else f"MISSING {self.what}: {self.fix}"


def ok(what: str) -> Check:
    return Check(True, what)


def missing(what: str, fix: str) -> Check:
    return Check(False, what, fix)
