"""Run identity: where a stage writes, and the fingerprint that keeps one run from continuing another. Training stages
write under `<run.root>/<run.id>/<stage>`; data prep under `<run.root>/data/<hash of the data config>`, so an
identical data config finds its finished output. Resuming a checkpoint under another fingerprint fails with one line
naming the first differing key.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe.config import from_dict
from kubellama.components.core.recipe.stages import BY_NAME

# Data keys that change how fast, not what, data prep writes (N pods give what one pod gives: data_prep/steps/).
DATA_VOLATILE = ("output", "workers", "error_samples", "parallelism", "reducers", "split_bytes", "partition_bytes",
                 "cpu", "memory")


# Set inside a KFP step (step_config): the launcher then ends a preempted stage with exit 143, not a traceback.
STEP_ENV = "KUBELLAMA_KFP_STEP"
_ADDRESS = re.compile(r"[0-9a-f]{12}")


def digest(data: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def config_hash(cfg: Any) -> str:
    return digest(_plain(cfg))


def new_id(cfg: Any) -> str:
    """A fresh run id: UTC time stamp (sortable), the config's hash (what it was) and a random part (two launches of
    one config in the same second are still two runs). Under torchrun every rank mints it, so there it comes from
    the rendezvous id all ranks share (a uuid per `torchrun --standalone`, kept across elastic restarts)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if rdzv == "none":
            raise ConfigError("run.id is empty under torchrun without a rendezvous id: each rank would pick its own "
                              "run folder; pass run.id=<id> (or torchrun --rdzv-id / --standalone)")
        return f"torchrun-{digest(rdzv, 8)}-{config_hash(cfg)[:6]}"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{config_hash(cfg)[:6]}-{secrets.token_hex(2)}"


def data_hash(cfg: Any) -> str:
    """The identity of a data config: the hash of the keys that shape data prep's output."""
    return digest({k: v for k, v in _plain(cfg.data).items() if k not in DATA_VOLATILE})


def data_output(cfg: Any) -> str:
    """The data prep output of this config: `data.output`, or content-addressed under `<run.root>/data/`.

    A compiled pipeline fixes the address at compile time. When a data key is edited in the KFP UI afterwards, the
    fixed folder is another config's: the output moves to this config's address beside it, so neither config ever
    finds the other's data."""
    out = cfg.data.output
    if not out:
        return storage.join(cfg.run.root, "data", data_hash(cfg))
    head, name = posixpath.split(out.rstrip("/"))
    if posixpath.basename(head) == "data" and _ADDRESS.fullmatch(name) and name != data_hash(cfg):
        return f"{head}/{data_hash(cfg)}"
    return out


def stage_output(cfg: Any, stage: str) -> str:
    if stage == "data_prep":
        return data_output(cfg)
    given = cfg[stage].output
    if given:
        return given
    if not cfg.run.id:
        raise ConfigError(f"{stage}.output is empty and so is run.id: set one of them")
    # A stage with variants (both reward models of one run) writes one folder per variant.
    folder = BY_NAME[stage].step_of(cfg[stage]) if stage in BY_NAME else stage
    return storage.join(cfg.run.root, cfg.run.id, folder)


def bind(cfg: Any, stage: str, run_id: str = "") -> Any:
    """Fill what a stage's config leaves to run time: the run id (`run_id`, e.g. the KFP run's, or a fresh one),
    the stage's output folder, and its data folder when that is data prep's output. Returns `cfg`, changed."""
    if not cfg.run.id:
        cfg.run.id = run_id or new_id(cfg)
    if stage == "data_prep":
        cfg.data.output = data_output(cfg)
        return cfg
    section = cfg[stage]
    section.output = stage_output(cfg, stage)
    if "data" in section and not section.data:
        section.data = data_output(cfg)
    return cfg


def fingerprint(cfg: Any, stage: str, volatile: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """Dotted key -> value of everything that shapes a training run of `stage`, plus `extra` (data manifest hash,
    parent checkpoint): what a checkpoint records and a resume compares."""
    out: dict[str, Any] = {f"model.{k}": v for k, v in _plain(cfg.model).items()}
    out.update({f"{stage}.{k}": v for k, v in _plain(cfg[stage]).items() if k not in volatile})
    out["run.seed"] = cfg.run.seed
    out.update(extra)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal values; or two spellings of one local folder (`runs/demo/latest/pretrain` and the run folder it links
    to, a relative and an absolute path): the same input, so not another config."""
    if a == b:
        return True
    local = all(isinstance(v, str) and v and not storage.is_remote(v) and os.path.exists(v) for v in (a, b))
    return local and os.path.realpath(a) == os.path.realpath(b)


def check(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str, run_id: str) -> None:
    """Refuse to continue checkpoint `where` under another fingerprint: one line naming the first differing key."""
    if saved is None:
        raise ConfigError(f"{where} records no config fingerprint (written by an older kubellama): it cannot be "
                          f"continued safely; start a new run (omit run.id) and pass it as <stage>.init instead")
    for key in sorted(set(saved) | set(current)):
        if not _same(saved.get(key), current.get(key)):
            raise ConfigError(
                f"run {run_id} was trained with {key}={saved.get(key)!r} ({where}), this config has "
                f"{key}={current.get(key)!r}: a run never continues under another config; start a new run (omit "
                f"run.id, or give a new one), optionally from it with <stage>.init, or set {key} back")


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """The identity of a shard set: its layout and every shard's checksum (not where it is stored)."""
    keep = ("format", "dtype", "seq_len", "fields", "shards")
    return digest({k: manifest.get(k) for k in keep})


def lineage(fp: Mapping[str, Any]) -> dict[str, Any]:
    """What reports and exports record about where a model came from."""
    return {"config_hash": digest(dict(fp)), "data_hash": fp.get("data.manifest"), "parent": fp.get("init") or None}


def step_config(config: str, stage: str, run_id: str = "", in_pod: bool = False, **inputs: str) -> Any:
    """The config of a KFP step: its sections (JSON) over the defaults, the URLs of its input artifacts put at
    `<stage>.<key>` (dotted for a nested key: `reward_models.helpfulness`), the pipeline run's id, and, for a
    training step holding the node's GPUs (`in_pod`), torchrun inside the pod. Bound like a CLI run."""
    cfg = from_dict(json.loads(config))
    os.environ[STEP_ENV] = stage
    for key, url in inputs.items():
        OmegaConf.update(cfg, f"{stage}.{key}", url, merge=False)
    if in_pod:
        cfg.cluster.scheduler = "local_cwd"
    return bind(cfg, stage, run_id)
