from dataclasses import dataclass, field

# The recipe's stages in order. The registry (components/core/recipe/stages.py) describes each; the config names
# them here so that it imports no code (a test keeps the two lists equal).
STAGE_NAMES = ("data_prep", "pretrain", "sft", "gatt", "reward", "rejection_sampling", "ppo", "safety_eval")


@dataclass
class PipelineConfig:
    # Which stages of the recipe (STAGE_NAMES) the pipeline runs, e.g. pipeline.stages.data_prep=false.
    # A skipped stage's output comes from the config instead: skipping data_prep makes pretraining read
    # `pretrain.data`; skipping pretrain makes later stages start from `pipeline.init_checkpoint`.
    stages: dict[str, bool] = field(default_factory=lambda: {name: True for name in STAGE_NAMES})
    # An HF or kubellama checkpoint URL to start from when pretraining is skipped.
    init_checkpoint: str = ""
    # Name of the pipeline in the KFP UI; each upload adds a version under it.
    name: str = "kubellama-llama2"
    # KFP API endpoint and (multi-user Kubeflow) profile namespace for `kubellama submit`.
    host: str = ""
    # Kubeflow profile namespace (multi-user) of `kubellama submit`; empty: none.
    namespace: str = ""
    # KFP experiment `kubellama submit` files its runs under (--experiment overrides).
    experiment: str = "kubellama"
    # KFP step caching. The resolved config is an input of every step, so a changed override never reuses a stale
    # step; turn it off to force reruns of unchanged steps.
    caching: bool = True
    # Where `kubellama run` (kfp.local) keeps task artifacts: a local folder (with an s3:// run.root, runs/<name>/kfp
    # under the current directory). On a cluster the kfp-launcher ConfigMap decides.
    local_root: str = "${run.root}/kfp"
