"""The fan-out's shared work folder: the plan step that starts it, the plan every step checks, the cleanup."""
from __future__ import annotations

import logging
import os
import posixpath
import time

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs
from kubellama.components.data_prep import world
from kubellama.components.data_prep.fanout import make_plan, make_tokenizer
from kubellama.conf.schema import Config

log = logging.getLogger("kubellama.data_prep")

WORK = "_work"


def shared_work(cfg: Config) -> str:
    """The work folder of pods that share nothing but storage."""
    return storage.join(cfg.data.output, WORK)


def read_plan(work: str) -> dict:
    path = storage.join(work, "plan.json")
    if not storage.exists(path):
        raise KubellamaError(f"{path} is missing: the data prep plan step has not run for this output")
    return storage.read_json(path)


def check_plan(plan: dict, expected: str) -> None:
    if expected and plan["id"] != expected:
        raise KubellamaError(f"the data prep plan changed while this pipeline ran (plan {plan['id']}, this step was "
                             f"started for {expected}): another run with this data config is writing the same output")


def reusable(cfg: Config) -> bool:
    """True when data.output is this config's content-addressed folder (named by its data hash, wherever the run
    root is) and already holds the finished output."""
    out = cfg.data.output
    addressed = posixpath.basename(out.replace("\\", "/").rstrip("/")) == runs.data_hash(cfg)
    return addressed and storage.is_complete(out) and storage.exists(storage.join(out, "report.json"))


def plan_step(cfg: Config, work: str, workers: int) -> dict:
    """Make the plan and the tokenizer. A rerun with the same plan keeps what its steps finished; another plan
    starts over (the work folder, the output's pretraining shards and its marker go)."""
    started = time.time()
    d = cfg.data
    out = d.output
    # The world's files first: the plan lists them among its inputs, and the tokenizer sample reads them.
    world.materialise(cfg)
    cfg = world.mixed(cfg)
    plan = make_plan(cfg)
    plan_url = storage.join(work, "plan.json")
    if storage.exists(plan_url):
        old = storage.read_json(plan_url)
        if old.get("id") == plan["id"] and storage.exists(storage.join(out, "tokenizer.model")):
            log.info("data prep: plan %s already made; finished steps are kept", plan["id"])
            return old
    storage.remove(storage.join(out, storage.COMPLETE))
    storage.remove(work, recursive=True)
    storage.remove(storage.join(out, "pretrain"), recursive=True)
    storage.makedirs(out)
    storage.makedirs(work)
    model_bytes, info = make_tokenizer(cfg, plan, workers)
    storage.write_bytes(storage.join(out, "tokenizer.model"), model_bytes)
    storage.write_text(storage.join(out, "tokenizer.sha256"), f"{info['sha256']}  tokenizer.model\n")
    plan["tokenizer"] = info
    plan["started"], plan["ended"] = started, time.time()
    storage.write_json(plan_url, plan)
    log.info("data prep: plan %s: %d files, %d units over %d workers, %d dedup partitions, %d pack groups",
             plan["id"], len(plan["files"]), len(plan["units"]), plan["parallelism"], plan["partitions"],
             plan["groups"])
    return plan


def cleanup_step(cfg: Config, work: str, index: int) -> None:
    """Remove worker `index`'s intermediate files (0: the shared ones too) once the output is complete."""
    if not storage.is_complete(cfg.data.output):
        return
    storage.remove(storage.join(work, f"w{index:04d}"), recursive=True)
    if index == 0:
        for name in ("dedup", "cluster", "pack"):
            storage.remove(storage.join(work, name), recursive=True)
        storage.remove(storage.join(work, "plan.json"))
    if not storage.is_remote(work):
        try:
            os.rmdir(work)
        except OSError:
            pass  # another worker's files are still there, or it is gone already
