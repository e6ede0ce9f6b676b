from dataclasses import dataclass, field
from typing import Dict

from components.core.stages import STAGES


@dataclass
class PipelineConfig:
    # Which stages of the recipe (components/core/stages.py) the pipeline runs, e.g. pipeline.stages.data_prep=false.
    # A skipped stage's output comes from the config instead: skipping data_prep makes pretraining read
    # `pretrain.data`; skipping pretrain makes later stages start from `pipeline.init_checkpoint`.
    stages: Dict[str, bool] = field(default_factory=lambda: {s.name: True for s in STAGES})
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
