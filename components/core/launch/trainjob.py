"""A training stage as a Kubeflow Trainer v2 TrainJob (`cluster.scheduler=trainjob`), from the same cluster config
as the torchx Volcano job (torchx_job.py). Pinned to Trainer v2.3.0 (`trainer.kubeflow.org/v1alpha1`): per-job pod
settings go in `runtimePatches`; tests/test_trainjob.py checks `build` against the v2.3.0 CRD schema. The runtime's
torch plugin sets the PET_* variables torchrun reads, so the command is plain torchrun with no rendezvous flags.
"""
from __future__ import annotations

import sys
from typing import Any

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.launch import pods

TRAINER_VERSION = "v2.3.0"
GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
# The replicated job and container of the trainer in Trainer's torch runtimes (constants.Node upstream).
NODE = "node"
# Our entry in spec.runtimePatches; Trainer keys patches by manager so several controllers can patch one job.
MANAGER = "kubellama.io/launcher"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SHM = "dshm"


def _env(cluster: Any) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "LOGLEVEL", "value": "WARNING"},
                                 {"name": pods.LAUNCHED, "value": "1"}]
    if cluster.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cluster.s3_endpoint})
    if cluster.s3_secret:
        # Trainer's API takes env entries only (no envFrom): one secretKeyRef per variable, the optional ones
        # optional, as the pipeline steps get them (pipelines/k8s.py).
        for key in pods.S3_KEYS + pods.S3_OPTIONAL_KEYS:
            if key == "AWS_ENDPOINT_URL" and cluster.s3_endpoint:
                continue
            ref = {"name": cluster.s3_secret, "key": key}
            if key in pods.S3_OPTIONAL_KEYS:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _resources(cluster: Any) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if cluster.gpus_per_node > 0:
        limits[cluster.gpu_resource] = str(cluster.gpus_per_node)
    for key in ("cpu", "memory"):
        value = cluster[key]
        if value:
            pods.quantity(value)  # one line naming the bad value instead of a refusal by the API server
            limits[key] = str(value)
    # Requests default to the limits: a Guaranteed pod, as the GPU device plugin requires for the GPUs anyway.
    return {"limits": limits}


def _pod_patch(cluster: Any, labels: dict[str, str]) -> dict[str, Any]:
    selector, tolerations = pods.placement(cluster)
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": int(cluster.grace_period_s)}
    if cluster.service_account:
        spec["serviceAccountName"] = cluster.service_account
    if selector:
        spec["nodeSelector"] = selector
    if tolerations:
        spec["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in tolerations]
    if cluster.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in cluster.image_pull_secrets]
    shm: dict[str, Any] = {"medium": "Memory"}
    if cluster.shm_size:
        # NCCL needs far more than the 64 MB container default; bound it so it cannot eat the node's memory.
        shm["sizeLimit"] = str(cluster.shm_size)
    spec["volumes"] = [{"name": SHM, "emptyDir": shm}]
    spec["containers"] = [{"name": NODE, "volumeMounts": [{"name": SHM, "mountPath": "/dev/shm"}]}]
    metadata: dict[str, Any] = {"labels": labels}
    if cluster.pod_annotations:
        metadata["annotations"] = {k: str(v) for k, v in cluster.pod_annotations.items()}
    return {"metadata": metadata, "spec": spec}


def build(cfg: Any, stage: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The TrainJob `name` running training stage `stage` of bound config `cfg` on cfg.cluster; `labels` go on the
    TrainJob and its pods."""
    cluster = cfg.cluster
    if cluster.runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise ConfigError(f"cluster.runtime_kind={cluster.runtime_kind!r}: expected ClusterTrainingRuntime or "
                          "TrainingRuntime")
    if not cluster.runtime:
        raise ConfigError("cluster.runtime is empty: name the (Cluster)TrainingRuntime the TrainJob runs on")
    if cluster.priority_class:
        print(f"kubellama: cluster.priority_class={cluster.priority_class} does not apply to a TrainJob (Trainer "
              f"{TRAINER_VERSION} has no per-job pod priority); the runtime {cluster.runtime} sets it",
              file=sys.stderr)
    grace = max(1, int(cluster.grace_period_s) - 5)
    command = ["python", "-m", "torch.distributed.run",
               # On SIGTERM torchrun forwards it to the ranks and waits this long for their save before SIGKILL.
               "--shutdown_timeout", str(grace),
               "-m", f"kubellama.components.{stage}", "--config", pods.config_url(cfg, stage)]
    trainer: dict[str, Any] = {
        "image": cluster.image_train,
        "command": command,
        "env": _env(cluster),
        "numNodes": max(1, int(cluster.nnodes)),
        "numProcPerNode": max(1, int(cluster.nproc_per_node)),
        "resourcesPerNode": _resources(cluster),
    }
    meta_labels = dict(labels)
    if cluster.queue:
        meta_labels[QUEUE_LABEL] = cluster.queue
    spec: dict[str, Any] = {
        "runtimeRef": {"name": cluster.runtime, "apiGroup": GROUP, "kind": cluster.runtime_kind},
        "trainer": trainer,
        "runtimePatches": [{
            "manager": MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": NODE,
                "template": {"spec": {"template": _pod_patch(cluster, labels)}},
            }]}}},
        }],
    }
    if cluster.timeout_s > 0:
        # The job's own deadline backs up the launcher's: pods stop even if the launcher is gone.
        spec["activeDeadlineSeconds"] = int(cluster.timeout_s)
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": meta_labels},
            "spec": spec}


def state(job: dict[str, Any]) -> tuple[str, str]:
    """("running" | "succeeded" | "failed", message) from a TrainJob's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "succeeded", cond.get("message", "")
        if cond.get("type") == "Failed":
            return "failed", f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "running", ""
