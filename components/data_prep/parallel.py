"""A worker pool with an ordered, bounded map: streaming input, results in input order, flat memory.

Unlike `multiprocessing.Pool.imap`, at most `inflight` batches are queued. Workers are spawned, not forked: the main
process may hold S3 client threads, which do not survive a fork.
"""
from __future__ import annotations

import collections
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self

CGROUP = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_limit(root: str = CGROUP) -> int | None:
    """CPUs this container may use by its cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), rounded up;
    None without a quota. A pod with `limits.cpu: 4` on a 96-core node sees all 96 in os.cpu_count()."""
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    cfs_quota, cfs_period = (_read(os.path.join(root, "cpu", f"cpu.cfs_{k}_us")) for k in ("quota", "period"))
    if cfs_quota and cfs_period and cfs_quota.lstrip("-").isdigit() and cfs_period.isdigit() \
            and int(cfs_quota) > 0 < int(cfs_period):
        return max(1, math.ceil(int(cfs_quota) / int(cfs_period)))
    return None


def worker_count(configured: int, root: str = CGROUP) -> int:
    """`configured` processes, or (0) as many as the CPUs this process may use: its cgroup quota, its CPU
    affinity, the machine's cores, whichever is smallest."""
    if configured > 0:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cpu_limit(root)
    return max(1, min(cores, limit) if limit else cores)


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
        """Let the batches in flight finish, then stop. A consumer may stop reading early (the tokenizer's
        trainer stops at its sample size); terminating a pool with tasks in flight can deadlock in
        multiprocessing's queue locks, and there are at most `inflight` batches to wait for."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
