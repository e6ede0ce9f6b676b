"""The Llama 2 recipe as a KFP pipeline, built from a resolved config and the stage registry (core/recipe/stages.py):
one step per stage (per variant, side by side), each input from the first candidate stage in the pipeline or else
imported from the config. One parameter per step, `config_<stage>`, holding only the sections that stage reads, so a
step's cache key changes only when what it reads changes.
"""
# No `from __future__ import annotations`: KFP reads the pipeline signature as real types.

import copy
import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Sequence
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, Model
from omegaconf import OmegaConf

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.recipe import stages
from kubellama.components.core.recipe.config import to_dict
from kubellama.conf.schema import Config
from kubellama.pipelines import k8s

STAGES = stages.STAGES
# Pipelines `build` can make: the configured recipe, or one stage alone (its inputs come from the config).
PIPELINES = {"llama2": None, **{s.name: s.name for s in STAGES}}
ARTIFACTS = {"dataset": Dataset, "model": Model}


def selected(cfg: Config, pipeline: str = "llama2") -> list[str]:
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{pipeline}'; available: {', '.join(PIPELINES)}")
    unknown = [k for k in cfg.pipeline.stages if k not in stages.BY_NAME]
    if unknown:
        raise ConfigError(f"unknown stage 'pipeline.stages.{unknown[0]}'; stages: {', '.join(stages.BY_NAME)}")
    only = PIPELINES[pipeline]
    names = [s.name for s in STAGES if (s.name == only if only else bool(cfg.pipeline.stages.get(s.name, True)))]
    if not names:
        raise ConfigError("pipeline.stages switches every stage off; nothing to run")
    return names


def variant_config(cfg: Config, name: str, variant: str) -> Config:
    """`cfg` as the step of variant `variant` of stage `name` sees it (a copy; `cfg` itself when no variant)."""
    if not variant:
        return cfg
    stage = stages.get(name)
    cfg = copy.deepcopy(cfg)
    section = cfg[name]
    section[stage.variant_key] = variant
    # A variant's own settings (`<name>.<variant>.<key>`, e.g. reward.safety.lr) override the shared `<name>.<key>`.
    # The step gets them merged, and none of the other variants' (nulled), so its cache key changes only with what
    # it runs. A variant's key with no shared one (reward.safety.aux_loss_weight) stays in its own section.
    for v in stage.variants:
        own = section.get(v)
        for key in list(own or ()):
            if key in section and v == variant and own[key] is not None:
                section[key] = own[key]
            if key in section or v != variant:
                own[key] = None
    return cfg


def stage_config(cfg: Config, name: str, variant: str = "") -> str:
    """The sections stage `name` (its step for `variant`) reads, as the JSON its step receives."""
    cfg = variant_config(cfg, name, variant)
    return json.dumps({sec: to_dict(cfg[sec]) for sec in stages.get(name).reads}, sort_keys=True)


def parameters(cfg: Config, names: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, str]:
    """The pipeline's parameters and their values for this config: what the UI shows and `submit` sends."""
    params = {f"config_{step}": stage_config(cfg, n, variant) for n in names
              for step, variant in stages.get(n).steps()}
    params["overrides"] = json.dumps(list(overrides))
    return params


def config_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()[:12]


def pipeline_name(cfg: Config, pipeline: str = "llama2") -> str:
    return cfg.pipeline.name if pipeline == "llama2" else f"{cfg.pipeline.name}-{pipeline.replace('_', '-')}"


def _import(url: str, cls: type, key: str, step: str = "") -> Any:
    """An importer of `url` (config key `key`) for a step input that no step of the pipeline makes (step `step`)."""
    if not url:
        made_by = stages.producer(step) if step else None
        why = f" (stage '{made_by.name}' is not in the pipeline)" if made_by else ""
        raise ConfigError(f"config key '{key}' is empty, and no step in the pipeline makes it{why}: give its URL")
    task = dsl.importer(artifact_uri=url, artifact_class=cls, reimport=False, metadata={"url": url})
    task.set_display_name(f"import {key}")
    return task.output


def _image(stage: stages.Stage, cfg: Config) -> str:
    return cfg.cluster.image_train if stage.launched else cfg.cluster.image_cpu


def _custom(stage: stages.Stage, cfg: Config) -> Callable[[dict[str, Any]], Any]:
    """The steps-adding function of a stage with a `build` hook, made before the pipeline is defined (KFP defines
    sub-pipelines only outside a pipeline's context)."""
    module, _, name = stage.build.partition(":")
    return getattr(importlib.import_module(module), name)(cfg, _image(stage, cfg), lambda t: k8s.schedule(t, cfg))


def producer(inp: stages.Input, made: dict[str, Any]) -> str | None:
    """The step whose output feeds `inp`: its first candidate source in the pipeline so far (None: import)."""
    return next((s for s in inp.sources if s in made), None)


def _step(stage: stages.Stage, step: str, variant: str, cfg: Config, params: dict[str, Any],
          made: dict[str, Any], custom: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Add the step `step` of `stage` (its `variant`, if any); `made` maps the steps run so far to their output
    artifacts, and holds the importers of config URLs (under "import <url>"). With `custom` (a stage's build
    hook), the stage adds its steps itself."""
    launched = stage.launched
    image = _image(stage, cfg)
    op = importlib.import_module(f"{stage.module}.component").op(image)
    if variant:
        # The KFP task takes its name from the component: name it after the step (reward-safety). The IR carries the
        # stage's program once per variant either way: KFP 2.16 compiles one component and executor per task.
        op.component_spec.name = step
    kwargs: dict[str, Any] = {"config": params[f"config_{step}"]}
    for inp in stage.inputs:
        found = producer(inp, made)
        if found is None:
            kind = next(p.output for p in map(stages.producer, inp.sources) if p is not None)
            given = OmegaConf.select(cfg, f"{stage.name}.{inp.key}")
            # Only the model a stage starts from falls back to pipeline.init_checkpoint: a policy checkpoint is no
            # stand-in for a reward model, so a skipped reward stage needs its URL given.
            fallback = kind == "model" and inp.key == "init" and not given
            url = cfg.pipeline.init_checkpoint if fallback else given
            key = "pipeline.init_checkpoint" if fallback else f"{stage.name}.{inp.key}"
            found = f"import {url}"
            if found not in made:  # one importer per URL, shared by the steps that read it
                made[found] = _import(url, ARTIFACTS[kind], key, "" if fallback else inp.name)
        kwargs[inp.name] = made[found]
    if custom is not None:
        made[step] = custom(kwargs)
        return
    in_pod = launched and k8s.trains_in_pod(cfg)
    if launched:
        # Each pipeline run trains into its own folder, named by the run (unless the config fixes run.id).
        kwargs.update(in_pod=in_pod, run_id=cfg.run.id or dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    task = op(**kwargs)
    task.set_display_name(f"{stage.title} ({variant})" if variant else stage.title)
    k8s.schedule(task, cfg, gpu=in_pod)
    made[step] = task.outputs[stage.output]


def build(cfg: Config, overrides: Sequence[str] = (), pipeline: str = "llama2") -> Callable:
    """A KFP pipeline for `cfg`: the configured recipe (`llama2`) or a single stage (`data_prep`, `pretrain`, ...)."""
    names = selected(cfg, pipeline)
    defaults = parameters(cfg, names, overrides)
    order = list(defaults)
    custom = {s.name: _custom(s, cfg) for s in STAGES if s.name in names and s.build}

    def llama2(*args: Any) -> None:
        params = dict(zip(order, args))
        made: dict[str, Any] = {}
        for stage in STAGES:
            if stage.name in names:
                for step, variant in stage.steps():
                    _step(stage, step, variant, cfg, params, made, custom.get(stage.name))

    # One parameter per step: the signature is made from the registry, so a new stage needs no edit here.
    llama2.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v, annotation=str)
         for k, v in defaults.items()])
    return dsl.pipeline(name=pipeline_name(cfg, pipeline),
                        description=f"Llama 2 recipe ({' -> '.join(names)}), kubellama config {config_hash(cfg)}"
                        )(llama2)
