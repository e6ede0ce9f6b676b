"""KFP wrappers of the data prep stage: the `data` config section in, the shard folder URL and the report out.

With `data.parallelism` 1 the stage is one step (`data_prep`); with N > 1 `steps` (the registry's build hook) adds
the fan-out of components/data_prep/steps/: plan -> workers -> dedup -> cluster -> pack -> merge -> cleanup, each
ParallelFor in a small sub-pipeline so the next step waits for the whole loop (also under kfp.local).
No `from __future__ import annotations` here: KFP reads the parameter annotations as real types.
"""
from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output
from kfp.dsl.python_component import PythonComponent


def data_prep(config: str, dataset: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown],
              html: Output[HTML]) -> str:
    """Clean, tokenize and shard the corpus described by `config` (the sections this stage reads, as JSON)."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep.stage import run

    cfg = step_config(config, "data_prep")
    return publish(run(cfg), cfg.data.output, dataset, metrics, report, html)


def data_prep_plan(config: str) -> str:
    """The plan and the tokenizer; returns the plan's id ("reused" when the output is already complete)."""
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps
    from kubellama.components.data_prep.parallel import worker_count

    cfg = step_config(config, "data_prep")
    if steps.reusable(cfg):
        return "reused"
    return steps.plan_step(cfg, steps.shared_work(cfg), worker_count(cfg.data.workers))["id"]


def data_prep_worker(config: str, plan: str, index: int, metrics: Output[Metrics]):
    """Worker `index`: clean, sign and tokenize its share; its counts as Metrics."""
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps
    from kubellama.components.data_prep.parallel import worker_count

    cfg = step_config(config, "data_prep")
    stats = steps.worker_step(cfg, steps.shared_work(cfg), int(index), worker_count(cfg.data.workers),
                              "" if plan == "reused" else plan)
    for key, value in steps.worker_metrics(stats).items():
        metrics.log_metric(key, value)


def data_prep_dedup(config: str, plan: str, index: int):
    """Dedup reducer `index`: exact duplicates and confirmed near-duplicate pairs of its partitions."""
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps

    cfg = step_config(config, "data_prep")
    steps.dedup_step(cfg, steps.shared_work(cfg), int(index), "" if plan == "reused" else plan)


def data_prep_cluster(config: str, plan: str):
    """Union-find over the reducers' pairs: which documents are dropped."""
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps

    cfg = step_config(config, "data_prep")
    steps.cluster_step(cfg, steps.shared_work(cfg), "" if plan == "reused" else plan)


def data_prep_pack(config: str, plan: str, index: int):
    """Packer `index`: its groups' kept documents, mixed and packed into token shards."""
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps

    cfg = step_config(config, "data_prep")
    steps.pack_step(cfg, steps.shared_work(cfg), int(index), "" if plan == "reused" else plan)


def data_prep_merge(config: str, plan: str, dataset: Output[Dataset], metrics: Output[Metrics],
                    report: Output[Markdown], html: Output[HTML]) -> str:
    """The manifest over every worker's shards, the small datasets and the report: the stage's outputs."""
    from kubellama.components.core.kfp.publish import publish
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps

    cfg = step_config(config, "data_prep")
    summary = steps.merge_step(cfg, steps.shared_work(cfg), "" if plan == "reused" else plan)
    return publish(summary, cfg.data.output, dataset, metrics, report, html)


def data_prep_cleanup(defaults: str, overrides: list, run_root: str, steps: list, index: int):
    """Remove worker `index`'s intermediate files (0: the shared ones too) once the output is complete. It resolves
    the run form itself (as the pipeline's first step does, from the same compiled config and form): kfp.local hands
    a loop at the pipeline's top level its loop item in place of any upstream task's output, such as that step's
    config slice."""
    from kubellama.components.core.recipe import runform
    from kubellama.components.core.recipe.runs import step_config
    from kubellama.components.data_prep import steps as data_steps

    cfg = step_config(runform.resolve(defaults, overrides, run_root, steps)["data_prep"], "data_prep")
    data_steps.cleanup_step(cfg, data_steps.shared_work(cfg), int(index))


def _component(fn: Callable, image: str) -> PythonComponent:
    return dsl.component(base_image=image, install_kfp_package=False)(fn)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return _component(data_prep, image)


def steps(cfg: Any, image: str, schedule: Callable[[Any], Any]) -> Callable[[dict], Any]:
    """The registry's build hook: the sub-pipelines of the fan-out, then add(kwargs) adding data prep's step(s)
    to the pipeline being defined and returning its Dataset."""
    d = cfg.data
    n = max(1, int(d.parallelism))
    reducers = int(d.reducers) or n

    def task(fn: Callable, name: str, **args: Any) -> Any:
        t = _component(fn, image)(**args)
        t.set_display_name(name)
        schedule(t)
        if d.cpu:
            t.set_cpu_request(str(d.cpu)).set_cpu_limit(str(d.cpu))
        if d.memory:
            t.set_memory_request(str(d.memory)).set_memory_limit(str(d.memory))
        return t

    def fan_out(fn: Callable, name: str, count: int, group: str) -> Any:
        """A sub-pipeline running `count` tasks of `fn` (index 0..count-1) through one ParallelFor."""
        def loop(config: str, plan: str) -> None:
            with dsl.ParallelFor(items=list(range(count)), parallelism=count) as i:
                task(fn, name, config=config, plan=plan, index=i)

        loop.__name__ = group
        return dsl.pipeline(name=group.replace("_", "-"))(loop)

    if n > 1:
        workers = fan_out(data_prep_worker, "data prep: worker", n, "data_prep_workers")
        dedup = fan_out(data_prep_dedup, "data prep: dedup reducer", reducers, "data_prep_reducers")
        packers = fan_out(data_prep_pack, "data prep: packer", n, "data_prep_packers")

    def add(kwargs: dict) -> Any:
        form = kwargs.pop("form")
        if n == 1:
            return task(data_prep, "data prep", **kwargs).outputs["dataset"]
        config = kwargs["config"]
        plan = task(data_prep_plan, "data prep: plan", config=config).output
        w = workers(config=config, plan=plan)
        w.set_display_name(f"data prep: {n} workers")
        r = dedup(config=config, plan=plan).after(w)
        r.set_display_name(f"data prep: {reducers} dedup reducers")
        c = task(data_prep_cluster, "data prep: dedup clusters", config=config, plan=plan).after(r)
        p = packers(config=config, plan=plan).after(c)
        p.set_display_name(f"data prep: {n} packers")
        merge = task(data_prep_merge, "data prep", config=config, plan=plan).after(p)
        # A loop at the top level (which also keeps kfp.local on the path that runs the loops inside sub-pipelines),
        # fed by the run form's own inputs: see data_prep_cleanup.
        with dsl.ParallelFor(items=list(range(n)), parallelism=n) as i:
            task(data_prep_cleanup, "data prep: cleanup", **form, index=i).after(merge)
        return merge.outputs["dataset"]

    return add
