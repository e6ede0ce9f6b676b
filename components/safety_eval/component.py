"""KFP wrapper of the safety evaluation: the model to gate and the data prep output in; the evaluation's folder,
the scores as Metrics, the Markdown report and the HTML report (charts embedded) out.

When the promotion gate fails, the step still publishes its report, then fails with the gate's line, and so does
the pipeline. No `from __future__ import annotations` here: KFP reads the parameter annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def safety_eval(config: str, model: Input[Model], data: Input[Dataset], dataset: Output[Dataset],
                metrics: Output[Metrics], report: Output[Markdown], html: Output[HTML], run_id: str = "",
                in_pod: bool = True) -> str:
    """Evaluate the model `model` points at (and the run's other checkpoints) and gate its promotion."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.launch.launcher import StageFailed
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.safety_eval import stage

    cfg = step_config(config, "safety_eval", run_id, in_pod, init=model.metadata.get("url") or model.uri,
                      data=data.metadata.get("url") or data.uri)
    try:
        summary = stage.run(cfg)
    except StageFailed as exc:
        publish(exc.summary, cfg.safety_eval.output, dataset, metrics, report, html)
        raise
    return publish(summary, cfg.safety_eval.output, dataset, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(safety_eval)
