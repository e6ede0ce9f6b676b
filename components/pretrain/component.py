"""KFP wrapper of the pretraining stage: token shards in, a checkpoint URL, metrics and the report out.

`config` holds only the sections this stage reads (core/recipe/stages.py). `run_id` is the pipeline run's id,
so each run trains into its own folder. With `in_pod` the step's pod holds the node's GPUs and torchrun runs
there; otherwise the stage launches a gang-scheduled job and streams its logs. No `from __future__ import
annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def pretrain(config: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             report: Output[Markdown], html: Output[HTML], run_id: str = "", in_pod: bool = True) -> str:
    """Pretrain on the shards that `data` points at."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.pretrain import stage

    cfg = step_config(config, "pretrain", run_id, in_pod, data=data.metadata.get("url") or data.uri)
    return publish(stage.run(cfg), cfg.pretrain.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(pretrain)
