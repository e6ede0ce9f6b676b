"""Every fan-out step on one machine: one after another in this process, or each phase's tasks in local
processes (`--workers-as-processes`), the split a pipeline runs as pods."""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing as mp
import tempfile
from collections.abc import Callable
from typing import Any

from kubellama.components.core.recipe.config import from_dict, to_dict
from kubellama.components.data_prep.parallel import worker_count
from kubellama.components.data_prep.steps.dedup import cluster_step, dedup_step
from kubellama.components.data_prep.steps.merge import merge_step
from kubellama.components.data_prep.steps.packer import pack_step
from kubellama.components.data_prep.steps.workdir import plan_step
from kubellama.components.data_prep.steps.worker import worker_step
from kubellama.conf.schema import Config

# The steps a phase runs, by name: a task in another process gets the name, not the function.
STEPS: dict[str, Callable[..., Any]] = {"worker_step": worker_step, "dedup_step": dedup_step,
                                        "cluster_step": cluster_step, "pack_step": pack_step}


def _call(step: str, config: dict, *args: Any) -> Any:
    """A step in another process (the config travels as a plain dict)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return STEPS[step](from_dict(config), *args)


def _ready() -> None:
    """Nothing: submitted once per process so the processes start while the plan is made."""


def _processes(count: int) -> concurrent.futures.ProcessPoolExecutor:
    """`count` processes forked from a server that imported the steps once: a fresh interpreter per process would
    import them `count` times over, and a fork of this process could inherit S3 client threads."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return concurrent.futures.ProcessPoolExecutor(count, mp_context=ctx)


def run_local(cfg: Config, processes: bool = False) -> dict:
    """Every step on this machine, in a local work folder: tasks one after another in this process, or (with
    `processes`) each phase's tasks in parallel processes, as many at a time as there are CPUs (more would only
    take turns on them), the CPUs shared among them."""
    d = cfg.data
    n = max(1, int(d.parallelism))
    cpus = worker_count(d.workers)
    at_once = min(max(n, int(d.reducers) or n), cpus)
    pool = _processes(at_once) if processes and n > 1 and at_once > 1 else None
    with tempfile.TemporaryDirectory(prefix="kubellama-data-") as work, contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)
            for _ in range(at_once):
                pool.submit(_ready)
        plan = plan_step(cfg, work, cpus)
        procs = max(1, cpus // at_once) if pool is not None else cpus
        phases: list[tuple[str, int, Callable[[int], tuple]]] = [
            ("worker_step", n, lambda i: (work, i, procs)),
            ("dedup_step", plan["reducers"], lambda i: (work, i)),
            ("cluster_step", 1, lambda i: (work,)),
            ("pack_step", n, lambda i: (work, i)),
        ]
        for step, tasks, args in phases:
            if pool is not None:
                config = to_dict(cfg)
                for f in [pool.submit(_call, step, config, *args(i)) for i in range(tasks)]:
                    f.result()
            else:
                for i in range(tasks):
                    STEPS[step](cfg, *args(i))
        return merge_step(cfg, work)
