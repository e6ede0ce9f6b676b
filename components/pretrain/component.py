"""KFP wrapper of the pretraining stage: token shards in, a checkpoint URL, metrics and the report out.

The stage's `launch` runs torchrun inside this pod (one node: the pod's GPUs come from the task's resource
request) or, for several nodes, a gang-scheduled Kubernetes job whose logs it streams. No `from __future__ import
annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl.python_component import PythonComponent
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def pretrain(config: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             report: Output[Markdown], html: Output[HTML], in_pod: bool = True) -> str:
    """Pretrain on the shards that `data` points at, with the resolved config `config` (JSON).

    `in_pod`: this pod holds the node's GPUs (the pipeline asked for them), so torchrun runs here rather than in a
    cluster job.
    """
    import json

    from components.core.config import from_dict
    from components.core.publish import publish
    from components.pretrain import stage

    cfg = from_dict(json.loads(config))
    cfg.pretrain.data = data.metadata.get("url") or data.uri
    if in_pod:
        cfg.cluster.scheduler = "local_cwd"
    return publish(stage.launch(cfg), cfg.pretrain.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(pretrain)
