"""Preemption: SIGTERM only sets a flag, and every rank asks `requested()` (one collective on a gloo group) at the
same point of its loop, so all ranks stop together, save and report `preempted` (the launcher turns that into exit
143). Use as a context manager around the loop: the previous handler is restored on exit."""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Self

from kubellama.components.core.train import dist


class Preemption:
    def __init__(self) -> None:
        self.flag = False  # this rank got SIGTERM
        self._previous: Any = None
        self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.flag = True

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        except ValueError:  # not the main thread: no handler, the flag stays False
            self._installed = False

    def restore(self) -> None:
        if self._installed and self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False

    def requested(self) -> bool:
        """Collective: True on every rank when any rank got SIGTERM."""
        return dist.any_rank(self.flag)

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
