"""KFP wrapper of the pipeline's first step: the run form's `overrides` and `run_root` applied to the config compiled
into the pipeline, each step's config slice out (core/recipe/runform.py). A CPU step of seconds: a bad override fails
it with one line, before any GPU is asked for.

No `from __future__ import annotations` here: KFP reads the annotations as real types, at compile time and again in
the step, where it evaluates this function's source alone. So the return annotation imports the outputs (one per
step of the registry) itself.
"""
from kfp import dsl
from kfp.dsl.python_component import PythonComponent


def resolve_config(defaults: str, overrides: list, run_root: str, steps: list) -> __import__(  # type: ignore[valid-type]
        "kubellama.components.core.recipe.runform", fromlist=["Slices"]).Slices:
    """The compiled config `defaults` (JSON) with the run's `run_root` (empty: the compiled one) and `overrides` (Hydra
    key=value) on top, as the config slice of every step; `steps` are this pipeline's, which the overrides must
    concern."""
    import sys

    from kubellama.components.core.errors import PREFIX, KubellamaError
    from kubellama.components.core.recipe import runform

    try:
        out = runform.resolve(defaults, overrides, run_root, steps)
    except KubellamaError as exc:
        # One line naming the override in the step's log, not a traceback.
        print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return runform.Slices(**out)


def op(image: str) -> PythonComponent:
    """The component on `image` (the project package and kfp are installed there, so nothing is pip-installed)."""
    return dsl.component(base_image=image, install_kfp_package=False)(resolve_config)
