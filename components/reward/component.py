"""KFP wrapper of the reward model stage: preference data and a model to start from in, the reward model's URL,
metrics and the report out.

`config` holds only the sections this stage reads (core/recipe/stages.py), `reward.kind` included: the
pipeline runs this component once per kind, side by side. No `from __future__ import annotations` here: KFP reads
the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def reward(config: str, data: Input[Dataset], init: Input[Model], model: Output[Model], metrics: Output[Metrics],
           report: Output[Markdown], html: Output[HTML], run_id: str = "", in_pod: bool = True) -> str:
    """Train a reward model on the preference pairs of `data`, starting from `init`."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.reward import stage

    cfg = step_config(config, "reward", run_id, in_pod, data=data.metadata.get("url") or data.uri,
                      init=init.metadata.get("url") or init.uri)
    return publish(stage.run(cfg), cfg.reward.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(reward)
