"""The run form of a compiled pipeline: the Hydra overrides a run is started with (its `overrides` parameter, in the
KFP UI's "Create run" form or from `kubellama submit`), applied at run time to the config compiled into it.

The pipeline's first step (core/kfp/component.py) calls `resolve`: every override is checked before anything is
applied, so an unknown key, or one that only compile time can honour, fails that cheap step with one line naming it,
before any GPU is asked for. Then each step gets only the config sections it reads (`stage_config`): an override of
`ppo.*` leaves every other step's input, and so its KFP cache key, byte-identical.
"""
from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runs, stages
from kubellama.components.core.recipe.config import from_dict, to_dict
from kubellama.conf.schema import Config

# Every step of the registry, in pipeline order: the first step's outputs, one config slice each.
STEPS: tuple[str, ...] = tuple(step for s in stages.STAGES for step, _ in s.steps())
_STAGE = {step: s for s in stages.STAGES for step, _ in s.steps()}
Slices = NamedTuple("Slices", [(step, str) for step in STEPS])  # type: ignore[misc]

# Config groups: choosing a preset re-composes the whole tree, which only compile time does.
PRESETS = ("model", "cluster")
# Keys the compiled pipeline has already spent: they shape its DAG (which steps, how many pods, which importers)
# or its pods (images, resources, node selection, secrets, timeouts), fixed in the IR. Prefixes of dotted keys.
COMPILE_ONLY: dict[str, str] = {
    "pipeline": "chooses the pipeline's steps, its importers and its caching",
    "cluster": "shapes the pods: images, resources, node selectors, secrets, scheduler, timeouts",
    "data.parallelism": "sets how many pods data prep fans out to",
    "data.reducers": "sets how many dedup pods data prep runs",
    "data.cpu": "sizes data prep's pods",
    "data.memory": "sizes data prep's pods",
    # The registry's step inputs: an earlier step's artifact, or an importer made at compile time, fills them.
    **{f"{s.name}.{i.key}": "is a step input: an earlier step's output or an importer made at compile time"
       for s in stages.STAGES for i in s.inputs},
    # A stage with variants runs one step per variant, each with its own value of the key.
    **{f"{s.name}.{s.variant_key}": f"picks the step, and the pipeline runs one per {s.variant_key} "
       f"({', '.join(dict(s.steps()))})" for s in stages.STAGES if s.variants},
}


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


def steps_of(names: Sequence[str]) -> list[str]:
    """The steps of stages `names` (a stage with variants has one per variant)."""
    return [step for n in names for step, _ in stages.get(n).steps()]


def slices(cfg: Config) -> dict[str, str]:
    """Every step's config slice (`stage_config`), by step name."""
    return {step: stage_config(cfg, s.name, variant) for s in stages.STAGES for step, variant in s.steps()}


def compile_only(override: str) -> str | None:
    """Why `override` (key=value) can only be given when compiling, or None when a run can take it."""
    key = override.split("=", 1)[0]
    if key.startswith(("+", "~")):
        return "adds or deletes a key, which only composing the config at compile time does"
    if key in PRESETS:
        return "picks a preset, which re-composes the whole config"
    return next((why for prefix, why in COMPILE_ONLY.items() if key == prefix or key.startswith(prefix + ".")), None)


def split(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(compile-time, run-time) parts of `overrides`: what the compiled pipeline must hold, and what a run of it
    can take through its `overrides` parameter."""
    compile_part = [o for o in overrides if compile_only(o)]
    return compile_part, [o for o in overrides if not compile_only(o)]


def _leaves(key: str, value: Any) -> Iterator[str]:
    """The dotted keys a value sets: a mapping sets each of its keys (`data={parallelism: 4}` sets
    `data.parallelism`)."""
    yield key
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(f"{key}.{k}", v)


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config node, for a did-you-mean hint."""
    if isinstance(node, DictConfig):
        for k in node:
            yield f"{prefix}{k!s}"
            yield from _keys(node._get_node(k), f"{prefix}{k!s}.")


_ABSENT = object()


def _parse(override: str, cfg: Config, steps: Sequence[str]) -> tuple[str, Any]:
    """The key and value of run-time override `override`, or a ConfigError naming what is wrong with it."""
    why = compile_only(override)
    if why:
        raise ConfigError(f"override '{override}' only applies when compiling ({why}): recompile the pipeline "
                          f"with it (kubellama compile ... {override}), a run cannot take it")
    try:
        parsed = OverridesParser.create().parse_override(override)
    except Exception as exc:  # Hydra's grammar raises its own exception types  # noqa: BLE001
        raise ConfigError(f"override '{override}' is not key=value: {str(exc).splitlines()[0]}") from None
    if parsed.is_sweep_override():
        raise ConfigError(f"override '{override}' is a sweep: a run takes one value per key")
    key, value = parsed.key_or_group, parsed.value()
    for leaf in _leaves(key, value):
        why = compile_only(f"{leaf}=")
        if why:
            raise ConfigError(f"override '{override}' sets {leaf}, which only applies when compiling ({why}): "
                              f"recompile the pipeline with it")
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        close = difflib.get_close_matches(key, list(_keys(cfg)), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in run-time override '{override}'{hint}")
    if "." not in key:
        raise ConfigError(f"override '{override}' sets the whole '{key}' section: give its keys one by one "
                          f"({key}.<key>=<value>)")
    section = key.split(".", 1)[0]
    # run.root counts as read by every step: each writes below it (data prep's output address derives from it).
    if key != "run.root" and not any(section in _STAGE[step].reads for step in steps):
        readers = [s.name for s in stages.STAGES if section in s.reads]
        fix = (f": recompile with {' or '.join(f'pipeline.stages.{r}=true' for r in readers)}" if readers
               else "; no stage of the pipeline reads it")
        raise ConfigError(f"override '{override}' would change nothing: no step of this pipeline reads "
                          f"'{section}'{fix}")
    return key, value


def apply(cfg: Config, overrides: Sequence[str], run_root: str = "", steps: Sequence[str] = STEPS) -> Config:
    """A copy of the compiled config `cfg` with the run's `run_root` (empty: the compiled one) and `overrides` on
    top; the data prep output moves with them as `kubellama run` derives it. Raises ConfigError naming the first
    override a run cannot take."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown step '{unknown[0]}'; steps: {', '.join(STEPS)}")
    # Every override's key is checked before any value is set, on a copy. The form's run_root is not parsed as an
    # override: a path may hold what Hydra's grammar reads otherwise (a comma makes a sweep).
    changes = [(o, *_parse(o, cfg, steps)) for o in overrides]
    if run_root and run_root != cfg.run.root:
        changes.insert(0, (f"run_root={run_root}", "run.root", run_root))
    out = copy.deepcopy(cfg)
    for override, key, value in changes:
        try:
            OmegaConf.update(out, key, value, merge=True)
        except Exception as exc:  # OmegaConf's validation errors  # noqa: BLE001
            first = " ".join(str(exc).split("\n")[0].split())
            raise ConfigError(f"bad value for config key '{key}' in run-time override '{override}': {first}") from None
    # The compiled config holds data prep's output where `kubellama run` put it: content-addressed under run.root,
    # unless the config named it. Derived, it follows the run's run.root and data keys; named, it stays (or moves
    # beside itself when it is a content address: runs.data_output).
    keys = {key for _, key, _ in changes}
    before = cfg.data.output
    if before == storage.join(cfg.run.root, "data", runs.data_hash(cfg)) and "data.output" not in keys:
        out.data.output = ""
    out.data.output = runs.data_output(out)
    for s in stages.STAGES:
        section = out.get(s.name)
        if section is not None and section.get("data") == before:
            section.data = out.data.output
    return out


def resolve(defaults: str, overrides: Sequence[str], run_root: str = "", steps: Sequence[str] = STEPS
            ) -> dict[str, str]:
    """What the pipeline's first step does: the compiled config (`defaults`, JSON) with the run's overrides applied,
    cut into every step's slice."""
    return slices(apply(from_dict(json.loads(defaults)), overrides, run_root, steps))
