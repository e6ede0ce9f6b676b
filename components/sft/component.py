"""KFP wrapper of the SFT stage: data prep's output and a model in, the fine-tuned model, metrics and report out.

`init` is the model to start from: the pretraining step's output, or an imported checkpoint when pretraining is not
in the pipeline. No `from __future__ import annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def sft(config: str, data: Input[Dataset], init: Input[Model], model: Output[Model], metrics: Output[Metrics],
        report: Output[Markdown], html: Output[HTML], run_id: str = "", in_pod: bool = True) -> str:
    """Fine-tune `init` on the SFT shards that `data` points at."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.sft import stage

    cfg = step_config(config, "sft", run_id, in_pod, data=data.metadata.get("url") or data.uri,
                      init=init.metadata.get("url") or init.uri)
    return publish(stage.run(cfg), cfg.sft.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(sft)
