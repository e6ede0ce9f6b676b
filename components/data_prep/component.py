"""KFP wrapper of the data prep stage: the `data` config section in, the shard folder URL and the report out.

No `from __future__ import annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl.python_component import PythonComponent
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output


def data_prep(config: str, dataset: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown],
              html: Output[HTML]) -> str:
    """Clean, tokenize and shard the corpus described by `config` (the sections this stage reads, as JSON)."""
    from components.core.publish import publish
    from components.core.runs import step_config
    from components.data_prep.stage import run

    cfg = step_config(config, "data_prep")
    return publish(run(cfg), cfg.data.output, dataset, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(data_prep)
