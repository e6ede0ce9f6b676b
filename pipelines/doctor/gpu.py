"""GPU nodes as the NVIDIA GPU operator labels them, and their driver against the CUDA of the training image."""
from __future__ import annotations

import re

from kubernetes.utils import parse_quantity

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.launch.pods import GPU_PRESENT, GPU_PRODUCT, placement
from kubellama.conf.schema import ClusterConfig
from kubellama.pipelines.doctor.check import Check, missing, ok
from kubellama.pipelines.doctor.kube import Api

# The oldest NVIDIA driver branch each CUDA release needs ("CUDA Toolkit and Minimum Required Driver Version", in
# the CUDA release notes). Minor-version compatibility lets a 12.x build start on any 12.x driver, but PTX JIT and
# the newest GPUs (Blackwell needs 12.8) do not: the preflight asks for the release's own branch. The one copy of
# this table in the project.
MIN_DRIVER: dict[tuple[int, int], int] = {
    (12, 0): 525, (12, 1): 530, (12, 2): 535, (12, 3): 545, (12, 4): 550, (12, 5): 555, (12, 6): 560,
    (12, 8): 570, (12, 9): 575, (13, 0): 580,
}
# The project's training image and the CUDA of its base image (TRAIN_BASE in images/docker-bake.hcl; a test keeps
# the two equal). Another image's CUDA comes from a `cudaX.Y` in its tag, or from --cuda.
TRAIN_IMAGE = ClusterConfig().image_train.rsplit(":", 1)[0]
TRAIN_CUDA = (12, 8)
# GPU feature discovery's driver labels: the current name first, then the one older operators set.
DRIVER_LABELS = ("nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver.major")


def parse_cuda(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not m:
        raise ConfigError(f"--cuda {text!r}: expected a CUDA version such as 12.8")
    return int(m[1]), int(m[2])


def image_cuda(image: str) -> tuple[int, int] | None:
    """The CUDA version `image` was built for, where its name tells it."""
    tag = image.rsplit("/", 1)[-1]
    m = re.search(r"cuda-?(\d+)\.(\d+)", tag)
    if m:
        return int(m[1]), int(m[2])
    repo = image.rsplit(":", 1)[0] if ":" in tag else image
    return TRAIN_CUDA if repo.split("@")[0] == TRAIN_IMAGE else None


def min_driver(cuda: tuple[int, int]) -> int | None:
    """The driver branch CUDA `cuda` needs: the table's entry for the newest release not after it (None: a CUDA
    major the table does not know)."""
    known = [v for v in MIN_DRIVER if v <= cuda and v[0] == cuda[0]]
    return MIN_DRIVER[max(known)] if known else None


def _name(node: dict) -> str:
    return node["metadata"]["name"]


def _gpus(node: dict, resource: str) -> int:
    value = (node.get("status", {}).get("allocatable") or {}).get(resource)
    return int(parse_quantity(value)) if value else 0


def _driver(node: dict) -> int | None:
    labels = node["metadata"].get("labels") or {}
    for key in DRIVER_LABELS:
        if str(labels.get(key, "")).isdigit():
            return int(labels[key])
    return None


def _why_none(api: Api, cluster: ClusterConfig) -> str:
    """Why no node matches the training pods' selector: which part of it fails."""
    present = api.items("/api/v1/nodes", f"{GPU_PRESENT}=true")
    if not present:
        return (f"no node carries {GPU_PRESENT}=true: install the NVIDIA GPU operator (its feature discovery labels "
                "GPU nodes), or use cluster=local")
    products = sorted({(n["metadata"].get("labels") or {}).get(GPU_PRODUCT, "?") for n in present})
    if cluster.gpu_product and cluster.gpu_product not in products:
        return (f"the GPU nodes are {', '.join(products)}, not cluster.gpu_product={cluster.gpu_product}: set "
                "cluster.gpu_product to one of them (or pick the matching cluster= preset)")
    return f"no GPU node matches cluster.node_selector {dict(cluster.node_selector)}: fix or drop it"


def gpu_checks(api: Api, cluster: ClusterConfig, cuda: tuple[int, int] | None) -> list[Check]:
    """The GPU nodes the training pods select (enough of them, with enough GPUs each), then their driver."""
    if cluster.gpus_per_node <= 0:
        return [ok("GPU nodes: none asked for (cluster.gpus_per_node=0)")]
    selector = ",".join(f"{k}={v}" for k, v in placement(cluster)[0].items())
    nodes = api.items("/api/v1/nodes", selector)
    what = f"GPU nodes ({selector})"
    if not nodes:
        return [missing(what, _why_none(api, cluster))]
    res, want = cluster.gpu_resource, cluster.gpus_per_node
    fit = [n for n in nodes if _gpus(n, res) >= want]
    if len(fit) < cluster.nnodes:
        have = ", ".join(f"{_name(n)} ({_gpus(n, res)})" for n in nodes)
        return [missing(what, f"{len(fit)} of them have {want} allocatable {res} and cluster.nnodes={cluster.nnodes} "
                              f"needs {cluster.nnodes} (allocatable: {have}): add GPU nodes, or lower "
                              "cluster.nnodes / cluster.gpus_per_node")]
    checks = [ok(f"{what}: {len(fit)} with {want} allocatable {res}, cluster.nnodes={cluster.nnodes}")]
    return [*checks, _driver_check(nodes, cluster.image_train, cuda or image_cuda(cluster.image_train))]


def _driver_check(nodes: list[dict], image: str, cuda: tuple[int, int] | None) -> Check:
    drivers = {_name(n): _driver(n) for n in nodes}
    unlabelled = [name for name, d in drivers.items() if d is None]
    what = "NVIDIA driver of the GPU nodes"
    if unlabelled:
        return missing(what, f"{', '.join(unlabelled)} carry no {DRIVER_LABELS[0]} label: enable GPU feature "
                             "discovery in the GPU operator (gfd.enabled=true)")
    seen = sorted({d for d in drivers.values() if d is not None})
    if cuda is None:
        return ok(f"{what}: {', '.join(map(str, seen))} (CUDA of {image} unknown: pass --cuda X.Y to check it)")
    need = min_driver(cuda)
    version = f"{cuda[0]}.{cuda[1]}"
    if need is None:
        return missing(what, f"CUDA {version} of {image} is newer than the driver table in pipelines/doctor/gpu.py: "
                             "add its minimum driver there")
    what = f"NVIDIA driver >= {need} for CUDA {version} of {image}"
    old = [f"{name} ({d})" for name, d in drivers.items() if d is not None and d < need]
    if old:
        return missing(what, f"{', '.join(old)}: upgrade the GPU operator's driver (driver.version) to the {need} "
                             "branch or newer, or use an image built for an older CUDA")
    return ok(f"{what}: {len(nodes)} GPU nodes at {', '.join(map(str, seen))}")
