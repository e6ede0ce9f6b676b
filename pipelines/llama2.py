"""The Llama 2 recipe as a KFP pipeline, built from a resolved config.

The DAG follows the paper: data_prep -> pretrain -> sft -> reward (helpfulness || safety) -> rejection sampling ->
ppo -> safety_eval. Each stage is a step of `STAGES` switched by `cfg.pipeline.stages`; a skipped stage's output
comes from the config (`pretrain.data`, `pipeline.init_checkpoint`) through an importer, so lineage in the UI still
starts somewhere real. Today the recipe has data_prep and pretrain; later stages add a step function and a flag.

Every step gets the whole resolved config as a JSON string parameter (the pipeline parameter `config`, whose default
is the config given to `build`). Being an input, it is part of each step's cache key: a changed override never reuses
a stale step. The `overrides` parameter records the command line that produced the config.
"""
# No `from __future__ import annotations`: KFP reads the pipeline signature as real types.

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.core.config import to_dict
from components.core.errors import ConfigError
from components.data_prep import component as data_prep_component
from components.pretrain import component as pretrain_component
from conf.schema import Config
from pipelines import k8s


@dataclass
class Handles:
    """Outputs of the steps so far, as the next step consumes them."""

    data: Any = None
    model: Any = None


def _data_prep(cfg: Config, config: Any, h: Handles) -> None:
    task = data_prep_component.op(cfg.cluster.image_cpu)(config=config)
    task.set_display_name("data prep")
    k8s.schedule(task, cfg)
    h.data = task.outputs["dataset"]


def _pretrain(cfg: Config, config: Any, h: Handles) -> None:
    if h.data is None:
        h.data = _import(cfg.pretrain.data, Dataset, "pretrain.data")
    in_pod = k8s.trains_in_pod(cfg)
    task = pretrain_component.op(cfg.cluster.image_train)(config=config, data=h.data, in_pod=in_pod)
    task.set_display_name("pretrain")
    k8s.schedule(task, cfg, gpu=in_pod)
    h.model = task.outputs["model"]


def _import(url: str, cls: type, key: str) -> Any:
    if not url:
        raise ConfigError(f"config key '{key}' is empty but a skipped stage needs it as input")
    task = dsl.importer(artifact_uri=url, artifact_class=cls, reimport=False, metadata={"url": url})
    task.set_display_name(f"import {key}")
    return task.output


# The recipe in order: (flag in cfg.pipeline.stages, step). A step reads the handles of earlier steps.
STAGES: list[tuple[str, Callable[[Config, Any, Handles], None]]] = [
    ("data_prep", _data_prep),
    ("pretrain", _pretrain),
]

# Pipelines `build` can make: the configured recipe, or one stage alone (its inputs come from the config).
PIPELINES = {"llama2": None, **{name: name for name, _ in STAGES}}


def selected(cfg: Config, pipeline: str = "llama2") -> list[str]:
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{pipeline}'; available: {', '.join(PIPELINES)}")
    only = PIPELINES[pipeline]
    names = [n for n, _ in STAGES if (n == only if only else bool(cfg.pipeline.stages[n]))]
    if not names:
        raise ConfigError("pipeline.stages switches every stage off; nothing to run")
    return names


def config_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()[:12]


def pipeline_name(cfg: Config, pipeline: str = "llama2") -> str:
    return cfg.pipeline.name if pipeline == "llama2" else f"{cfg.pipeline.name}-{pipeline.replace('_', '-')}"


def build(cfg: Config, overrides: Sequence[str] = (), pipeline: str = "llama2") -> Callable:
    """A KFP pipeline for `cfg`: the configured recipe (`llama2`) or a single stage (`data_prep`, `pretrain`)."""
    names = selected(cfg, pipeline)
    steps = [step for n, step in STAGES if n in names]
    default_config, default_overrides = config_json(cfg), json.dumps(list(overrides))
    start_from = cfg.pipeline.init_checkpoint

    @dsl.pipeline(name=pipeline_name(cfg, pipeline),
                  description=f"Llama 2 recipe ({' -> '.join(names)}), kubellama config {config_hash(cfg)}")
    def llama2(config: str = default_config, overrides: str = default_overrides):
        h = Handles()
        for step in steps:
            step(cfg, config, h)
        if h.model is None and start_from:
            # Pretraining skipped: later stages start from an existing (HF or kubellama) checkpoint.
            h.model = _import(start_from, Model, "pipeline.init_checkpoint")

    return llama2
