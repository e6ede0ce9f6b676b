from dataclasses import dataclass, field


@dataclass
class StagesConfig:
    """Which stages of the recipe the pipeline runs; a skipped stage's output comes from the config instead.

    Skipping data_prep makes pretraining read `pretrain.data` as it stands; skipping pretrain makes later stages start
    from `pipeline.init_checkpoint`. Later stages (sft, reward models, rejection sampling, ppo, safety eval) add a flag
    here when they join the DAG (pipelines/llama2.py).
    """

    data_prep: bool = True
    pretrain: bool = True


@dataclass
class PipelineConfig:
    stages: StagesConfig = field(default_factory=StagesConfig)
    # An HF or kubellama checkpoint URL to start from when pretraining is skipped.
    init_checkpoint: str = ""
    # Name of the pipeline in the KFP UI; each upload adds a version under it.
    name: str = "kubellama-llama2"
    # KFP API endpoint and (multi-user Kubeflow) profile namespace for `kubellama submit`.
    host: str = ""
    namespace: str = ""
    experiment: str = "kubellama"
    # KFP step caching. The resolved config is an input of every step, so a changed override never reuses a stale
    # step; turn it off to force reruns of unchanged steps.
    caching: bool = True
    # Where `kubellama run` (kfp.local) keeps task artifacts: a local folder (with an s3:// run.root, runs/<name>/kfp
    # under the current directory). On a cluster the kfp-launcher ConfigMap decides.
    local_root: str = "${run.root}/kfp"
