"""An ordered, bounded map over worker processes: streaming input, results in input order, flat memory.

`multiprocessing.Pool.imap` reads its whole input up front; here at most `inflight` batches are queued, so a
corpus of any size streams through with a few batches in memory. Workers are spawned (not forked): the main
process may hold S3 client threads, which do not survive a fork.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Any, Callable, Iterable, Iterator


def worker_count(configured: int) -> int:
    return configured if configured > 0 else (os.cpu_count() or 1)


def ordered_map(fn: Callable[..., Any], batches: Iterable[Any], workers: int, args: tuple = (),
                initializer: Callable[..., None] | None = None, initargs: tuple = (),
                inflight: int = 0) -> Iterator[Any]:
    """fn(batch, *args) for each batch, in order; in this process when workers <= 1."""
    if workers <= 1:
        if initializer:
            initializer(*initargs)
        for batch in batches:
            yield fn(batch, *args)
        return
    inflight = inflight or 2 * workers + 1
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (batch, *args)))
            if len(pending) >= inflight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
