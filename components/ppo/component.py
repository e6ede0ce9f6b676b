"""KFP wrapper of the PPO stage: preference prompts, the policy to start from and the two reward models in; the
PPO policy, metrics and report out. No `from __future__ import annotations` here: KFP reads the parameter
annotations as real types.
"""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def ppo(config: str, data: Input[Dataset], init: Input[Model], reward_helpfulness: Input[Model],
        reward_safety: Input[Model], model: Output[Model], metrics: Output[Metrics], report: Output[Markdown],
        html: Output[HTML], run_id: str = "", in_pod: bool = True) -> str:
    """PPO from `init` against the combined reward of the two reward models, on the prompts of `data`."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.ppo import stage

    def url(a: Input) -> str:
        return a.metadata.get("url") or a.uri

    cfg = step_config(config, "ppo", run_id, in_pod, data=url(data), init=url(init),
                      **{"reward_models.helpfulness": url(reward_helpfulness),
                         "reward_models.safety": url(reward_safety)})
    return publish(stage.run(cfg), cfg.ppo.output, model, metrics, report, html)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(ppo)
