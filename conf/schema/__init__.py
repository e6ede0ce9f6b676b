"""Typed schema of the whole config tree.

Every knob of every stage lives here, with the Llama 2 paper's defaults. The YAML files beside this package pick
presets (model shapes, clusters); Hydra merges them into these dataclasses in struct mode, so an unknown key or a
wrongly typed value fails at composition time instead of deep inside a run.
"""
from dataclasses import dataclass, field

from kubellama.conf.schema.cluster import ClusterConfig
from kubellama.conf.schema.data import DataConfig
from kubellama.conf.schema.gatt import GattConfig
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.pipeline import PipelineConfig
from kubellama.conf.schema.ppo import PpoConfig
from kubellama.conf.schema.rejection_sampling import RejectionSamplingConfig
from kubellama.conf.schema.reward import RewardConfig
from kubellama.conf.schema.safety_eval import SafetyEvalConfig
from kubellama.conf.schema.sft import SftTrainConfig
from kubellama.conf.schema.tools import GenerateConfig, PlanConfig
from kubellama.conf.schema.train import PretrainConfig


@dataclass
class RunConfig:
    # The run's name: part of run.root's default and of job names.
    name: str = "llama2"
    # Every stage reads and writes below this URL: a local folder or s3://bucket/prefix.
    root: str = "runs/${run.name}"
    # Training outputs live under <root>/<id>/<stage>, where no other run writes. Empty: the KFP run id inside a
    # pipeline, else a time stamp plus config hash. `run.id=<existing>` continues that run (same config only).
    id: str = ""
    # Seed of every random draw of the run (data prep's data.seed defaults to it).
    seed: int = 1234
    # The license of the weights this run makes, as its model cards state it (an SPDX id such as Apache-2.0, or a
    # name). Empty: the project's own license (pyproject.toml).
    license: str = ""
    # The license of each data source, by its name in data.sources, data.sft.sources, ... (a model card lists the
    # sources its data prep report names; one without an entry here reads "not stated").
    data_licenses: dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SftTrainConfig = field(default_factory=SftTrainConfig)
    gatt: GattConfig = field(default_factory=GattConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    safety_eval: SafetyEvalConfig = field(default_factory=SafetyEvalConfig)


__all__ = [
    "ClusterConfig",
    "Config",
    "DataConfig",
    "GattConfig",
    "GenerateConfig",
    "ModelConfig",
    "PipelineConfig",
    "PlanConfig",
    "PpoConfig",
    "PretrainConfig",
    "RejectionSamplingConfig",
    "RewardConfig",
    "RunConfig",
    "SafetyEvalConfig",
    "SftTrainConfig",
]
