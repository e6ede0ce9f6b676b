"""The one list of the recipe's stages. The CLI's commands, the pipeline's steps (`pipelines/llama2.py`), the
single-stage pipelines and `kubellama run`'s report list are all derived from it.

Adding a stage touches its folder (`components/<name>/`: stage.py, component.py, __main__.py), its config dataclass
(`conf/schema/`, section `<name>`) and one entry here. Names only: core imports no stage code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Input:
    """A step input: the artifact `name` of the component, made by stage `source`. When that stage is not in the
    pipeline, the URL at config key `<stage>.<key>` is imported instead."""

    name: str
    source: str
    key: str


@dataclass(frozen=True)
class Stage:
    name: str  # the config section and step name, snake_case
    title: str  # display name in the KFP UI
    help: str
    # Config sections the step reads: its pipeline parameter holds only these, so a change elsewhere leaves the
    # step's inputs (and so its KFP cache key) untouched.
    reads: tuple[str, ...]
    output: str  # the component's main output artifact: "dataset" or "model"
    inputs: tuple[Input, ...] = ()
    # A training stage runs through the shared launcher (core/launch.py) in a GPU pod or a torchx job.
    training: bool = False
    # "module:function" for a stage that adds its steps itself (one that fans out into several, or sizes its pods)
    # instead of the one generic step: function(cfg, image, schedule), called before the pipeline is defined (it may
    # define sub-pipelines), returns add(kwargs) -> the stage's output artifact; kwargs are the generic step's
    # arguments, schedule(task) applies the cluster's settings to a task.
    build: str = ""

    @property
    def module(self) -> str:
        return f"components.{self.name}"

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    @property
    def entry(self) -> str:
        return f"{self.module}.stage:main"


STAGES: tuple[Stage, ...] = (
    Stage("data_prep", "data prep", "stage: clean, tokenize and shard the corpus", reads=("data",),
          output="dataset", build="components.data_prep.component:steps"),
    Stage("pretrain", "pretrain", "stage: FSDP pretraining (torchx local or Kubernetes)",
          reads=("run", "model", "pretrain", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"),), training=True),
)

BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    from components.core.errors import ConfigError

    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]
