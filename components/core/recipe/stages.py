"""The one list of the recipe's stages. The CLI's commands, the pipeline's steps (`pipelines/llama2.py`), the
single-stage pipelines and `kubellama run`'s report list are all derived from it.

Adding a stage touches its folder (`components/<name>/`: stage.py, component.py, __main__.py), its config dataclass
(`conf/schema/`, section `<name>`) and one entry here. Names only: core imports no stage code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubellama.components.core.errors import ConfigError


@dataclass(frozen=True)
class Input:
    """A step input: the artifact `name` of the component, made by stage `source` (or by one step of a stage with
    variants, e.g. `reward_safety`). `source` may list candidates instead, the first one in the pipeline winning
    (a model from gatt, else sft, else pretrain). When none is in the pipeline, the URL at config key
    `<stage>.<key>` is imported instead."""

    name: str
    source: str | tuple[str, ...]
    key: str

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)


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
    # Runs through the one launcher (core/launch/launcher.py) on the GPU image: a GPU pod or a torchx job. The
    # training stages do, and so does the safety eval (it generates with the models it judges).
    launched: bool = False
    # Run once per variant, side by side, with `<name>.<variant_key>=<variant>` (the reward models: helpfulness ||
    # safety). Steps and output folders are then named `<name>_<variant>`.
    variants: tuple[str, ...] = ()
    variant_key: str = "kind"

    def steps(self) -> tuple[tuple[str, str], ...]:
        """(step name, variant) of each of the stage's steps."""
        return tuple((f"{self.name}_{v}", v) for v in self.variants) or ((self.name, ""),)

    def step_of(self, section: Any) -> str:
        """The step (and output folder name) a config section of this stage runs as."""
        return f"{self.name}_{section[self.variant_key]}" if self.variants else self.name
    # "module:function" for a stage that adds its steps itself (one that fans out into several, or sizes its pods)
    # instead of the one generic step: function(cfg, image, schedule), called before the pipeline is defined (it may
    # define sub-pipelines), returns add(kwargs) -> the stage's output artifact; kwargs are the generic step's
    # arguments, schedule(task) applies the cluster's settings to a task.
    build: str = ""

    @property
    def module(self) -> str:
        return f"kubellama.components.{self.name}"

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    @property
    def entry(self) -> str:
        return f"{self.module}.stage:main"


STAGES: tuple[Stage, ...] = (
    Stage("data_prep", "data prep", "stage: clean, tokenize and shard the corpus", reads=("data",),
          output="dataset", build="kubellama.components.data_prep.component:steps"),
    Stage("pretrain", "pretrain", "stage: FSDP pretraining (torchx local or Kubernetes)",
          reads=("run", "model", "pretrain", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"),), launched=True),
    Stage("sft", "SFT", "stage: supervised fine-tuning on packed dialogs, loss on answers only",
          reads=("run", "model", "sft", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"), Input("init", "pretrain", "init")), launched=True),
    Stage("gatt", "GAtt", "stage: Ghost Attention fine-tuning and the turn-by-turn instruction-adherence eval",
          reads=("run", "model", "gatt", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"), Input("init", "sft", "init")), launched=True),
    Stage("reward", "reward model", "stage: helpfulness or safety reward model (reward.kind)",
          reads=("run", "model", "reward", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"), Input("init", ("gatt", "sft", "pretrain"), "init")),
          launched=True, variants=("helpfulness", "safety")),
    Stage("rejection_sampling", "rejection sampling",
          "stage: best of K samples by the combined reward, pooled across rounds, then SFT on the pool",
          reads=("run", "model", "rejection_sampling", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"), Input("init", ("gatt", "sft", "pretrain"), "init"),
                  Input("reward_helpfulness", "reward_helpfulness", "reward_models.helpfulness"),
                  Input("reward_safety", "reward_safety", "reward_models.safety")), launched=True),
    Stage("ppo", "PPO", "stage: PPO against the combined reward with a KL penalty to the initial policy",
          reads=("run", "model", "ppo", "cluster"), output="model",
          inputs=(Input("data", "data_prep", "data"),
                  Input("init", ("rejection_sampling", "gatt", "sft", "pretrain"), "init"),
                  Input("reward_helpfulness", "reward_helpfulness", "reward_models.helpfulness"),
                  Input("reward_safety", "reward_safety", "reward_models.safety")), launched=True),
    # Last: evaluates the newest model of the run (and the run's other checkpoints side by side), gates promotion
    # and writes the run's page.
    Stage("safety_eval", "safety eval", "stage: safety benchmarks, side-by-side report, promotion gate",
          reads=("run", "model", "safety_eval", "cluster", "plan"), output="dataset",
          inputs=(Input("model", ("ppo", "rejection_sampling", "gatt", "sft", "pretrain"), "init"),
                  Input("data", "data_prep", "data")), launched=True),
)

BY_NAME = {s.name: s for s in STAGES}


def producer(name: str) -> Stage | None:
    """The stage making the output of stage or step `name` (None for a name not in the registry)."""
    return next((s for s in STAGES if name == s.name or name in dict(s.steps())), None)


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ConfigError(f"unknown stage '{name}'; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]
