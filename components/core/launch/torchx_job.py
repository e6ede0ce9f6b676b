"""A training stage as a torchx job: the AppDef (torchrun on cluster.nnodes × nproc_per_node) and its dry run, which
is the Volcano Job on Kubernetes (`cluster.scheduler=kubernetes`) and the torchrun command line locally (`local_cwd`).

torchx's Kubernetes scheduler already emits one Volcano task per node, c10d rendezvous on task 0, a memory /dev/shm,
GPU limits and the Istio opt-out; `_patch_pods` adds what GPU operator node pools need (see pods.placement), a
/dev/shm size limit, pull secrets and the S3 Secret as environment. torchx and kubernetes are imported only here,
inside the functions that use them.
"""
from __future__ import annotations

import json
import shlex
import sys
from typing import Any

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.launch.pods import GPU, LAUNCHED, RDZV_PORT, config_url, placement, quantity
from kubellama.conf.schema.cluster import ClusterConfig


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
           # On SIGTERM torchrun forwards it to the ranks and waits this long for their save before SIGKILL.
           "--shutdown_timeout", str(max(1, cluster.grace_period_s - 5)),
           "-m", module, *args]
    # Keep the rendezvous variable unquoted so bash expands it; quote everything else. `exec`: torchrun becomes the
    # container's main process, so the SIGTERM of a pod deletion reaches it (bash would not forward it).
    line = "exec " + " ".join(c if "${" in c else shlex.quote(c) for c in cmd)
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


def stage_app(cfg: Any, stage: str):
    """The torchx AppDef of training stage `stage` for cfg.cluster: its workers read the launcher's resolved config."""
    name = f"{cfg.run.name}-{stage}".replace("_", "-")
    return app(cfg.cluster, f"kubellama.components.{stage}", ["--config", config_url(cfg, stage)], name=name)


def resource(cluster: ClusterConfig):
    from torchx import specs

    cpu, mem = quantity(cluster.cpu), int(quantity(cluster.memory) / 1e6)
    if cluster.gpu_resource == GPU:
        return specs.Resource(cpu=cpu, gpu=cluster.gpus_per_node, memMB=mem)  # type: ignore[arg-type]
    # A MIG profile (nvidia.com/mig-1g.10gb, ...) is an extended resource of its own.
    devices = {cluster.gpu_resource: cluster.gpus_per_node} if cluster.gpus_per_node else {}
    return specs.Resource(cpu=cpu, gpu=0, memMB=mem, devices=devices)  # type: ignore[arg-type]


def scheduler_cfg(cluster: ClusterConfig) -> dict[str, Any]:
    if cluster.scheduler == "kubernetes":
        # torchx's Volcano scheduler needs a queue: Volcano's own default one unless another is named.
        cfg: dict[str, Any] = {"queue": cluster.queue or "default", "namespace": cluster.namespace}
        if cluster.service_account:
            cfg["service_account"] = cluster.service_account
        if cluster.priority_class:
            cfg["priority_class"] = cluster.priority_class
        return cfg
    if cluster.scheduler in ("local_cwd", "local"):
        return {}
    raise ConfigError(f"cluster.scheduler={cluster.scheduler!r}: expected local_cwd, kubernetes or trainjob")


def _patch_pods(resource: dict[str, Any], cluster: ClusterConfig) -> None:
    from kubernetes.client.models import V1EnvFromSource, V1LocalObjectReference, V1SecretEnvSource, V1Toleration

    for task in resource["spec"]["tasks"]:  # type: ignore[index]
        pod = task["template"]
        spec = pod.spec
        spec.termination_grace_period_seconds = cluster.grace_period_s
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


def volcano_job(cfg: Any, stage: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The Volcano Job `name` torchx makes for training stage `stage`; `labels` go on the job and its pods."""
    _, job = dryrun(cfg.cluster, stage_app(cfg, stage))
    assert isinstance(job, dict)
    # torchx names the job `<app>-<random>` and uses that id in labels and the rendezvous id: use ours instead.
    job = json.loads(json.dumps(job).replace(job["metadata"]["name"], name))
    job["metadata"].setdefault("labels", {}).update(labels)
    for task in job["spec"]["tasks"]:
        task["template"]["metadata"].setdefault("labels", {}).update(labels)
    return job


def volcano_state(job: dict) -> tuple[str, str]:
    """("running" | "succeeded" | "failed", message) from a Volcano Job's phase."""
    phase = ((job.get("status") or {}).get("state") or {}).get("phase", "")
    if phase == "Completed":
        return "succeeded", ""
    if phase in ("Failed", "Aborted", "Terminated"):
        return "failed", phase
    return "running", phase
