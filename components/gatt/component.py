"""KFP wrapper of the GAtt stage: data prep's output and the SFT model in; the GAtt model, metrics and report out.

`init` is the model to start from: the SFT step's output, or an imported checkpoint when SFT is not
in the pipeline. No `from __future__ import annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def gatt(config: str, data: Input[Dataset], init: Input[Model], model: Output[Model], metrics: Output[Metrics],
         report: Output[Markdown], html: Output[HTML], run_id: str = "", in_pod: bool = True) -> str:
    """Ghost Attention on the dialogs that `data` points at, starting from `init`."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.gatt import stage

    cfg = step_config(config, "gatt", run_id, in_pod, data=data.metadata.get("url") or data.uri,
                      init=init.metadata.get("url") or init.uri)
    return publish(stage.run(cfg), cfg.gatt.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(gatt)
