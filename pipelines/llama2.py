"""The Llama 2 recipe as a KFP pipeline, built from a resolved config and the stage registry (core/recipe/stages.py):
one step per stage (per variant, side by side), each input from the first candidate stage in the pipeline or else
imported from the config.

Its run form (the parameters the KFP UI's "Create run" form shows) is what a user changes: `overrides`, Hydra
overrides applied at run time (empty by default: the compile-time ones are in the compiled config), and `run_root`.
A first, cheap step applies them to the compiled config and hands each step only the sections it reads
(core/recipe/runform.py), so a step's cache key changes only when what it reads changes.
"""
# No `from __future__ import annotations`: KFP reads the pipeline signature as real types.

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
from kubellama.components.core.kfp import component as run_form
from kubellama.components.core.recipe import runform, stages
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


# Where they were before the run form moved them into the core (its first step slices the config too).
variant_config = runform.variant_config
stage_config = runform.stage_config


def parameters(cfg: Config, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The run form: the pipeline's parameters and their values for this config, what the UI shows and `submit`
    sends. `overrides` are run-time ones (runform.split); the compile-time ones are in `cfg`."""
    return {"overrides": list(overrides), "run_root": cfg.run.root}


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
    kwargs: dict[str, Any] = {"config": params[step]}
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
        # A build hook also gets the run form's inputs (the compiled config, `overrides`, `run_root`, the steps).
        made[step] = custom({**kwargs, "form": params["form"]})
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
    """A KFP pipeline for `cfg`: the configured recipe (`llama2`) or a single stage (`data_prep`, `pretrain`, ...).
    `overrides` made `cfg` and are in it: a run's `overrides` parameter starts empty."""
    names = selected(cfg, pipeline)
    steps = runform.steps_of(names)
    defaults = parameters(cfg)
    custom = {s.name: _custom(s, cfg) for s in STAGES if s.name in names and s.build}
    resolver = run_form.op(cfg.cluster.image_cpu)

    def llama2(overrides: list, run_root: str) -> None:
        first = resolver(defaults=config_json(cfg), overrides=overrides, run_root=run_root, steps=steps)
        first.set_display_name("run config")
        k8s.schedule(first, cfg)
        params: dict[str, Any] = {step: first.outputs[step] for step in steps}
        params["form"] = {"defaults": config_json(cfg), "overrides": overrides, "run_root": run_root, "steps": steps}
        made: dict[str, Any] = {}
        for stage in STAGES:
            if stage.name in names:
                for step, variant in stage.steps():
                    _step(stage, step, variant, cfg, params, made, custom.get(stage.name))

    # The compiled config is the form's defaults: KFP reads them from the signature.
    llama2.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v, annotation=type(v))
         for k, v in defaults.items()])
    return dsl.pipeline(name=pipeline_name(cfg, pipeline),
                        description=f"Llama 2 recipe ({' -> '.join(names)}), kubellama config {config_hash(cfg)}"
                        )(llama2)
