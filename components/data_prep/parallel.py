"""A worker pool with an ordered, bounded map: streaming input, results in input order, flat memory.

`multiprocessing.Pool.imap` reads its whole input up front; here at most `inflight` batches are queued, so a
corpus of any size streams through with a few batches in memory. Workers are spawned (not forked): the main
process may hold S3 client threads, which do not survive a fork. One pool serves the whole stage, so the
start-up cost (a fresh interpreter per worker) is paid once.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Any, Callable, Iterable, Iterator


def worker_count(configured: int) -> int:
    return configured if configured > 0 else (os.cpu_count() or 1)


class WorkerPool:
    """`workers` processes (none when workers <= 1: the work then runs in this process, still streaming)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None

    def map(self, fn: Callable[..., Any], batches: Iterable[Any], args: tuple = (),
            inflight: int = 0) -> Iterator[Any]:
        """fn(batch, *args) for each batch, in input order."""
        if self._pool is None:
            for batch in batches:
                yield fn(batch, *args)
            return
        inflight = inflight or 2 * self.workers + 1
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(self._pool.apply_async(fn, (batch, *args)))
            if len(pending) >= inflight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
