"""What every training pod gets, whichever job runs it (a torchx Volcano job, a TrainJob or a pipeline step's own
pod): GPU placement for the NVIDIA GPU operator, the S3 Secret's keys, resource quantities, and the resolved config
the workers read."""
from __future__ import annotations

from typing import Any

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.conf.schema.cluster import ClusterConfig

GPU = "nvidia.com/gpu"
GPU_PRESENT = "nvidia.com/gpu.present"
GPU_PRODUCT = "nvidia.com/gpu.product"
# Environment variables a pod takes from the cluster's S3 Secret; the optional ones may sit there too (MinIO, Ceph).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")
# c10d rendezvous port on task 0 (torchx's own default).
RDZV_PORT = 29500
# Set in every worker of a job launched from here: the launcher prints the summary, the workers need not.
LAUNCHED = "KUBELLAMA_LAUNCHED"


def placement(cluster: ClusterConfig) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Node selector and tolerations of a training pod, the same for a pipeline step and a torchx job: GPU nodes of
    the GPU operator (and the product, when set) tolerating the portable GPU taint, then the user's own."""
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    if cluster.gpus_per_node > 0:
        selector[GPU_PRESENT] = "true"
        if cluster.gpu_product:
            selector[GPU_PRODUCT] = cluster.gpu_product
        tolerations.append({"key": GPU, "operator": "Exists", "value": None, "effect": "NoSchedule"})
    selector.update({k: str(v) for k, v in (cluster.node_selector or {}).items()})
    for t in cluster.tolerations:
        entry = {"key": t.key or None, "operator": t.operator, "value": t.value, "effect": t.effect}
        if entry not in tolerations:
            tolerations.append(entry)
    return selector, tolerations


def quantity(value: str | None) -> float:
    """A Kubernetes quantity ("8", "500m", "64Gi") as a number; one line naming a bad value."""
    if not value:
        return 0.0
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(value))
    except ValueError as exc:
        raise ConfigError(f"cluster: bad Kubernetes quantity {value!r}: {exc}") from None


def config_url(cfg: Any, stage: str) -> str:
    """The resolved config a launcher writes next to the stage's output and its workers read (`--config`)."""
    return storage.join(cfg[stage].output, "config.yaml")

