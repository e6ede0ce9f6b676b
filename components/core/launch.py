"""Launch a training stage as a torchx job: torchrun on this machine (`local_cwd`) or a Volcano job on Kubernetes.

Every training stage goes through `app()` + `dryrun()` / `submit()`. The job runs `python -m components.<stage>
--config <url>`, where the config is the resolved tree written next to the stage's output, so workers see exactly
the config the launcher saw, whatever overrides or KFP parameters produced it.

torchx's Kubernetes scheduler already emits one Volcano task per node, c10d rendezvous on task 0, /dev/shm as a
memory emptyDir, `nvidia.com/gpu` limits and the Istio opt-out annotation. What it lacks for GPU node pools managed
by the NVIDIA GPU operator is added to each pod template here: the node selector `nvidia.com/gpu.present=true`
(+ `nvidia.com/gpu.product` when the cluster names one), the toleration for the `nvidia.com/gpu` taint, a size limit
on /dev/shm, image pull secrets and the S3 credentials Secret as environment.
"""
from __future__ import annotations

import shlex
import sys
import threading
from typing import Any

import yaml

from components.core.errors import ConfigError, KubellamaError
from conf.schema.cluster import ClusterConfig

GPU = "nvidia.com/gpu"
GPU_PRESENT = "nvidia.com/gpu.present"
GPU_PRODUCT = "nvidia.com/gpu.product"
# Environment variables a pod takes from the cluster's S3 Secret; the optional ones may sit there too (MinIO, Ceph).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")


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
# c10d rendezvous port on task 0 (torchx's own default).
RDZV_PORT = 29500
# Set in every worker of a job launched from here: the launcher prints the summary, the workers need not.
LAUNCHED = "KUBELLAMA_LAUNCHED"


def _quantity(value: str | None) -> float:
    if not value:
        return 0.0
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(value))
    except ValueError as exc:
        raise ConfigError(f"cluster: bad Kubernetes quantity {value!r}: {exc}") from None


def app(cluster: ClusterConfig, module: str, args: list[str], name: str, env: dict[str, str] | None = None):
    """A torchx AppDef running `python -m module args` under torchrun on cluster.nnodes × nproc_per_node."""
    from torchx import specs
    from torchx.specs import macros

    local = cluster.scheduler.startswith("local")
    nnodes, nproc = max(1, cluster.nnodes), max(1, cluster.nproc_per_node)
    if nnodes == 1:
        endpoint = "localhost:0"  # one agent: let it pick a free port
    else:
        # Volcano exposes task 0's hostname to every task; torchx's kubernetes scheduler names it TORCHX_RANK0_HOST
        # on task 0 and VC_<ROLE>_0_HOSTS elsewhere (the rank0_env macro). `$$` escapes torchx's own templating.
        endpoint = f"$${{{macros.rank0_env}:=localhost}}:{RDZV_PORT}"
    python = sys.executable if local else "python"
    cmd = [python, "-m", "torch.distributed.run", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
           "--rdzv_id", macros.app_id, "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
           "-m", module, *args]
    # Keep the rendezvous variable unquoted so bash expands it; quote everything else.
    line = " ".join(c if "${" in c else shlex.quote(c) for c in cmd)
    role = specs.Role(
        # Volcano exports task 0's host as VC_<ROLE>_0_HOSTS: a role name with '-' would not be a shell variable.
        name="".join(c for c in name.split("-")[-1] if c.isalnum()) or "trainer",
        image=cluster.image_train,
        entrypoint="bash",
        args=["-c", line],
        num_replicas=nnodes,
        min_replicas=nnodes,
        resource=resource(cluster),
        env={"PYTHONUNBUFFERED": "1", "LOGLEVEL": "WARNING", LAUNCHED: "1",
             # The endpoint is configuration, not a secret: plain env (credentials come from cluster.s3_secret).
             **({"AWS_ENDPOINT_URL": cluster.s3_endpoint} if cluster.s3_endpoint else {}), **(env or {})},
        port_map={"c10d": RDZV_PORT},
        max_retries=cluster.retries,
    )
    return specs.AppDef(name=name, roles=[role])


def resource(cluster: ClusterConfig):
    from torchx import specs

    cpu, mem = _quantity(cluster.cpu), int(_quantity(cluster.memory) / 1e6)
    if cluster.gpu_resource == GPU:
        return specs.Resource(cpu=cpu, gpu=cluster.gpus_per_node, memMB=mem)  # type: ignore[arg-type]
    # A MIG profile (nvidia.com/mig-1g.10gb, ...) is an extended resource of its own.
    devices = {cluster.gpu_resource: cluster.gpus_per_node} if cluster.gpus_per_node else {}
    return specs.Resource(cpu=cpu, gpu=0, memMB=mem, devices=devices)  # type: ignore[arg-type]


def scheduler_cfg(cluster: ClusterConfig) -> dict[str, Any]:
    if cluster.scheduler == "kubernetes":
        cfg: dict[str, Any] = {"queue": cluster.queue, "namespace": cluster.namespace}
        if cluster.service_account:
            cfg["service_account"] = cluster.service_account
        if cluster.priority_class:
            cfg["priority_class"] = cluster.priority_class
        return cfg
    if cluster.scheduler in ("local_cwd", "local"):
        return {}
    raise ConfigError(f"cluster.scheduler={cluster.scheduler!r}: expected local_cwd or kubernetes")


def _patch_pods(resource: dict[str, Any], cluster: ClusterConfig) -> None:
    from kubernetes.client.models import V1EnvFromSource, V1LocalObjectReference, V1SecretEnvSource, V1Toleration

    for task in resource["spec"]["tasks"]:  # type: ignore[index]
        pod = task["template"]
        spec = pod.spec
        selector, tolerations = placement(cluster)
        spec.node_selector = {**(spec.node_selector or {}), **selector} or None
        spec.tolerations = [V1Toleration(**t) for t in tolerations] or None
        pod.metadata.annotations = {**(pod.metadata.annotations or {}), **(cluster.pod_annotations or {})}
        for vol in spec.volumes or []:
            if vol.empty_dir is not None and vol.empty_dir.medium == "Memory" and cluster.shm_size:
                # NCCL needs far more than Docker's 64 MB /dev/shm; bound it so it cannot eat the node's memory.
                vol.empty_dir.size_limit = cluster.shm_size
        if cluster.image_pull_secrets:
            spec.image_pull_secrets = [V1LocalObjectReference(name=n) for n in cluster.image_pull_secrets]
        for c in spec.containers:
            c.image_pull_policy = cluster.image_pull_policy
            if cluster.s3_secret:
                c.env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=cluster.s3_secret))]


def dryrun(cluster: ClusterConfig, appdef) -> tuple[Any, dict[str, Any] | list[str]]:
    """(torchx dry-run info, the job as plain data): the Volcano Job for kubernetes, the command line locally."""
    from torchx.runner import get_runner

    runner = get_runner()
    info = runner.dryrun(appdef, cluster.scheduler, cfg=scheduler_cfg(cluster))
    if cluster.scheduler == "kubernetes":
        from kubernetes.client import ApiClient

        resource = info.request.resource
        _patch_pods(resource, cluster)
        resource.setdefault("metadata", {})["namespace"] = cluster.namespace
        return info, ApiClient().sanitize_for_serialization(resource)
    return info, [str(info)]


def render(job: dict[str, Any] | list[str]) -> str:
    if isinstance(job, dict):
        return yaml.safe_dump(job, sort_keys=False)
    return "\n".join(job) + "\n"


def submit(cluster: ClusterConfig, appdef, stream: bool = True) -> str:
    """Submit, stream the logs of every node to stdout, wait; returns the final state name. Raises on failure."""
    from torchx.runner import get_runner
    from torchx.specs import AppState

    info, _ = dryrun(cluster, appdef)
    with get_runner() as runner:
        handle = runner.schedule(info)
        print(f"kubellama: submitted {handle}", flush=True)
        threads = []
        if stream:
            role = appdef.roles[0]
            for k in range(role.num_replicas):
                t = threading.Thread(target=_follow, args=(runner, handle, role.name, k), daemon=True)
                t.start()
                threads.append(t)
        try:
            status = runner.wait(handle, wait_interval=2)
        except KeyboardInterrupt:
            runner.cancel(handle)
            raise
        for t in threads:
            t.join(timeout=5)
    state = status.state if status else AppState.UNKNOWN
    if state != AppState.SUCCEEDED:
        detail = f": {status.msg}" if status is not None and status.msg else ""
        raise KubellamaError(f"job {handle} ended {AppState(state).name}{detail}")
    return AppState(state).name


def _follow(runner, handle: str, role: str, k: int) -> None:
    try:
        for line in runner.log_lines(handle, role, k, should_tail=True):
            print(f"[{role}/{k}] {line}", end="" if line.endswith("\n") else "\n", flush=True)
    except Exception as exc:  # log streaming is best effort; the job's state decides success
        print(f"kubellama: log stream of {role}/{k} ended: {exc}", file=sys.stderr)
