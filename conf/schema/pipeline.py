from dataclasses import dataclass, field


@dataclass
class StagesConfig:
    """Which stages of the recipe the pipeline runs; a skipped stage's output comes from `init_checkpoint`."""

    data_prep: bool = True
    pretrain: bool = True


@dataclass
class PipelineConfig:
    stages: StagesConfig = field(default_factory=StagesConfig)
    # An HF or kubellama checkpoint URL to start from when pretraining is skipped.
    init_checkpoint: str = ""
    host: str = ""
    experiment: str = "kubellama"
